//! The data model: distinguished names and Active Directory binary values.

pub mod ad;
pub mod dn;

pub use ad::{guid_from_ad_bytes, guid_to_ad_bytes, GuidError, Sid, SidError};
pub use dn::{Dn, DnError, Rdn};
