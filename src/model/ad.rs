//! TEMPORARY local placeholder — replaced by branch `dn`; never committed.
#![allow(missing_docs)]
pub struct Sid;
pub struct SidError;
pub fn guid_from_ad_bytes() {}
pub fn guid_to_ad_bytes() {}
