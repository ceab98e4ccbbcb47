//! Keeps the pure modules pure: `model`, `delta` and `rules` may not use async, tokio, file or
//! network I/O, a clock, or randomness of their own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// (pattern, why). A pattern matches as a whole word sequence in code (comments are skipped).
const FORBIDDEN: &[(&str, &str)] = &[
    ("async", "async code"),
    ("await", "async code"),
    ("tokio", "the tokio runtime"),
    ("std::fs", "file I/O"),
    ("std::net", "network I/O"),
    ("std::process", "process I/O"),
    ("File::", "file I/O"),
    ("TcpStream", "network I/O"),
    ("Utc::now", "the clock"),
    ("Local::now", "the clock"),
    ("SystemTime", "the clock"),
    ("Instant::now", "the clock"),
    ("thread_rng", "global randomness"),
    ("OsRng", "global randomness"),
    ("getrandom", "global randomness"),
    ("from_entropy", "global randomness"),
    ("new_v4", "random UUIDs"),
    ("RandomState::new", "randomly seeded hashing in output"),
    ("std::env", "the environment"),
    ("static mut", "globals"),
    ("OnceLock", "process-wide state"),
    ("LazyLock", "process-wide state"),
    ("lazy_static", "process-wide state"),
    ("thread_local", "process-wide state"),
    ("Mutex", "process-wide state"),
    ("RwLock", "process-wide state"),
];

/// The deliberate exceptions: (file under `src/`, pattern, why it may).
const ALLOWED: &[(&str, &str, &str)] = &[
    // The bounded interner of configured names: a cache that changes no result.
    ("model/name.rs", "OnceLock", "interned configured names"),
    ("model/name.rs", "Mutex", "interned configured names"),
    // A DN's own RDNs, parsed from its text when first asked for: per value, not process-wide.
    (
        "model/dn.rs",
        "OnceLock",
        "a DN's RDNs, parsed when first asked for",
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The violations in one file's text: (line number, pattern, why). Test modules are skipped:
/// they may use what they like.
fn violations(text: &str) -> Vec<(usize, &'static str, &'static str)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("#[cfg(test)]") {
            break; // test modules sit at the end of a file by convention
        }
        if code.starts_with("//") {
            continue;
        }
        let code = match code.find("//") {
            Some(p) => &code[..p],
            None => code,
        };
        for (pat, why) in FORBIDDEN {
            let mut start = 0;
            while let Some(p) = code[start..].find(pat) {
                let at = start + p;
                let before = code[..at].chars().next_back();
                let after = code[at + pat.len()..].chars().next();
                let word_start =
                    !pat.starts_with(is_word_char) || !before.is_some_and(is_word_char);
                let word_end = !pat.ends_with(is_word_char) || !after.is_some_and(is_word_char);
                if word_start && word_end {
                    out.push((i + 1, *pat, *why));
                    break;
                }
                start = at + pat.len();
            }
        }
    }
    out
}

#[test]
fn checker_flags_what_it_should() {
    assert_eq!(violations("let t = chrono::Utc::now();").len(), 1);
    assert_eq!(violations("async fn f() {}").len(), 1);
    assert_eq!(violations("// async is mentioned in a comment").len(), 0);
    assert_eq!(violations("let asynchronous = 1;").len(), 0);
    assert_eq!(violations("use std::fs::read;").len(), 1);
    assert_eq!(
        violations("static X: OnceLock<u8> = OnceLock::new();").len(),
        1
    );
    assert_eq!(violations("let m = std::sync::Mutex::new(1);").len(), 1);
    assert_eq!(
        violations("#[cfg(test)]\nmod tests { async fn t() {} }").len(),
        0
    );
}

#[test]
fn pure_modules_stay_pure() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut failures = Vec::new();
    for module in ["model", "delta", "rules"] {
        let mut files = Vec::new();
        rust_files(&root.join(module), &mut files);
        assert!(!files.is_empty(), "no files under src/{module}");
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let rel = f
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            for (line, pat, why) in violations(&text) {
                if ALLOWED.iter().any(|(file, p, _)| *file == rel && *p == pat) {
                    continue;
                }
                failures.push(format!("{}:{line}: `{pat}` ({why})", f.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "pure modules use forbidden things:\n{}",
        failures.join("\n")
    );
}
