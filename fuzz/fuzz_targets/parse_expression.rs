//! Fuzzes the expression front end: parsing and compiling never panic, every diagnostic's span
//! lies inside the text and renders, and a parsed expression prints to text that parses back to
//! the same tree.
#![no_main]

use dirsync::rules::diagnostic::Origin;
use dirsync::rules::expr::{compile, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let origin = Origin::default();
    if let Err(diagnostics) = compile(text) {
        for d in diagnostics.iter() {
            assert!(d.span.start <= d.span.end && d.span.end <= text.len());
            let _ = d.render(text, &origin);
        }
    }
    if let Ok(expr) = parse(text) {
        let printed = expr.to_string();
        match parse(&printed) {
            Ok(again) => assert!(again.same_as(&expr), "{text:?} printed as {printed:?}"),
            Err(d) => panic!("{text:?} printed as {printed:?}, which does not parse: {d}"),
        }
    }
});
