//! The data model: entries, attribute names and values, distinguished names, anchors, and
//! Active Directory's binary forms (objectGUID, objectSid).
//!
//! Pure data: no I/O, no clock, no async.

pub mod ad;
mod change;
pub mod dn;
mod entry;
pub(crate) mod name;
mod value;

pub use ad::{guid_from_ad_bytes, guid_to_ad_bytes, GuidError, Sid, SidError};
pub(crate) use change::serialize_redacted_attributes;
pub use change::{values, ApplyError, AttributeChange, Change, ChangeOp};
pub use dn::{Dn, DnError, Rdn};
pub use entry::{Anchor, Attributes, Entry, TargetId, TargetObject};
pub use name::{cmp_ignore_case, eq_ignore_case, AttrName, ObjectType};
pub(crate) use value::b64;
pub use value::{Reference, Value, Values};
