//! Fuzzes the LDAP control codecs of `connector::ldap::control` — what a directory server sends
//! back (DirSync and paged-results response values, ranged attribute descriptions) is read by
//! this crate's own code, which must never panic; and a value that decodes re-encodes to a value
//! that decodes to the same thing.
#![no_main]

use dirsync::connector::ldap::control::{DirSyncRequest, DirSyncResponse, PagedResults, RangedAttr};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = DirSyncResponse::decode(data) {
        assert_eq!(DirSyncResponse::decode(&r.encode()).ok(), Some(r));
    }
    if let Ok(r) = DirSyncRequest::decode(data) {
        assert_eq!(DirSyncRequest::decode(&r.encode()).ok(), Some(r));
    }
    if let Ok(p) = PagedResults::decode(data) {
        assert_eq!(PagedResults::decode(&p.encode()).ok(), Some(p));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(Some(r)) = RangedAttr::parse(text) {
            assert_eq!(RangedAttr::parse(&r.format()).ok(), Some(Some(r)));
        }
    }
});
