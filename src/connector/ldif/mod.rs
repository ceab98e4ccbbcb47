//! LDIF (RFC 2849): a streaming reader and a deterministic writer of LDAP Data Interchange
//! Format files, the mapping of LDIF records onto model [`Entry`](crate::model::Entry)s and
//! [`Change`](crate::model::Change)s, and two connectors built on them: [`LdifSource`] (a content
//! file plus an optional directory of change files) and [`LdifTarget`] (a directory kept in one
//! LDIF file, rewritten atomically after every apply).
//!
//! The reader and writer ([`LdifReader`], [`parse_str`], [`LdifWriter`]) do no I/O of their own
//! beyond the `BufRead`/`Write` they are given, and never follow the URL form of values
//! (`attr:< file:///…`): data never makes this crate read a file or open a connection. Nothing
//! here panics on malformed input: every problem is an [`LdifError`] naming its line (and column
//! where one is known). Only [`LdifSource`] and [`LdifTarget`] touch the file system.

use std::fmt;

use crate::model::{AttrName, AttributeChange, Attributes, ChangeOp, Dn, Rdn, Value};

mod map;
mod read;
mod source;
mod target;
mod write;

pub use map::{default_binary_attributes, default_object_type_map, default_reference_attributes};
pub use read::{parse_str, LdifReader};
pub use source::{LdifSource, LdifSourceConfig, Unmapped};
pub use target::{LdifObjectTypeConfig, LdifTarget, LdifTargetConfig};
pub use write::LdifWriter;

/// A malformed LDIF input: where (1-based physical line, and 1-based column in characters when
/// known) and what.
///
/// Displays as `line 12: message` (with ` (column 5)` appended when the column is known).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}{}", column.map(|c| format!(" (column {c})")).unwrap_or_default())]
pub struct LdifError {
    /// The 1-based physical line the problem is on.
    pub line: usize,
    /// The 1-based column (in characters) on that line, when known.
    pub column: Option<usize>,
    /// What is wrong, with a hint where one helps.
    pub message: String,
}

impl LdifError {
    /// An error on `line` without a column.
    pub(crate) fn new(line: usize, message: impl Into<String>) -> LdifError {
        LdifError {
            line,
            column: None,
            message: message.into(),
        }
    }

    /// An error at `line`, `column`.
    pub(crate) fn at(line: usize, column: usize, message: impl Into<String>) -> LdifError {
        LdifError {
            line,
            column: Some(column),
            message: message.into(),
        }
    }
}

/// One record of an LDIF file: a content record (an entry) or a change record.
#[derive(Debug, Clone, PartialEq)]
pub struct LdifRecord {
    /// The 1-based line of the record's `dn:` line.
    pub line: usize,
    /// The record's DN.
    pub dn: Dn,
    /// The `control:` lines of a change record, in order (kept, not interpreted).
    pub controls: Vec<LdifControl>,
    /// What the record says.
    pub body: LdifBody,
}

/// The part of an [`LdifRecord`] after its DN and controls.
#[derive(Debug, Clone, PartialEq)]
pub enum LdifBody {
    /// A content record: the entry's attribute values, in file order.
    Content(Vec<LdifValue>),
    /// `changetype: add`: the new entry's attribute values, in file order.
    Add(Vec<LdifValue>),
    /// `changetype: delete`.
    Delete,
    /// `changetype: modify`: the modifications, in order.
    Modify(Vec<LdifModification>),
    /// `changetype: modrdn` or `moddn`.
    ModDn(ModDn),
}

/// One attribute value line of a record.
#[derive(Debug, Clone, PartialEq)]
pub struct LdifValue {
    /// The 1-based line the value starts on.
    pub line: usize,
    /// The attribute description, options included (`cn;lang-en`), as spelled.
    pub attribute: AttrName,
    /// The value: [`Value::String`], or [`Value::Bytes`] when a Base64 value is not UTF-8.
    pub value: Value,
}

/// One `add:`/`delete:`/`replace:` block of a `changetype: modify` record.
#[derive(Debug, Clone, PartialEq)]
pub struct LdifModification {
    /// The 1-based line of the `add:`/`delete:`/`replace:` line.
    pub line: usize,
    /// `add:` is [`ChangeOp::Add`], `delete:` is [`ChangeOp::Remove`], `replace:` is
    /// [`ChangeOp::Replace`].
    pub op: ChangeOp,
    /// The attribute description.
    pub attribute: AttrName,
    /// The values (none: delete the attribute, or replace it with nothing).
    pub values: Vec<LdifValue>,
}

/// The fields of a `changetype: modrdn` / `moddn` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModDn {
    /// `newrdn:`.
    pub new_rdn: Rdn,
    /// `deleteoldrdn: 1`.
    pub delete_old_rdn: bool,
    /// `newsuperior:`, when the entry moves to another parent.
    pub new_superior: Option<Dn>,
}

impl ModDn {
    /// The entry's DN after the rename: the new RDN under the new superior (or under the old
    /// parent). `None` when `old` is the root DN, which has no parent to stay under.
    pub fn new_dn(&self, old: &Dn) -> Option<Dn> {
        let parent = match &self.new_superior {
            Some(p) => p.clone(),
            None => old.parent()?,
        };
        Some(parent.child(self.new_rdn.clone()))
    }
}

/// A `control:` line of a change record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LdifControl {
    /// The control's OID.
    pub oid: String,
    /// The criticality (`false` when not written).
    pub critical: bool,
    /// The control value, when one is written.
    pub value: Option<Vec<u8>>,
}

/// A change to write with [`LdifWriter::write_change`], in model terms.
#[derive(Debug, Clone, PartialEq)]
pub enum LdifChange {
    /// `changetype: add` with these attributes.
    Add(Attributes),
    /// `changetype: delete`.
    Delete,
    /// `changetype: modify` with these changes ([`ChangeOp::Remove`] is written `delete:`).
    Modify(Vec<AttributeChange>),
    /// `changetype: modrdn`.
    ModDn(ModDn),
}

impl LdifRecord {
    /// Whether this is a change record (has a `changetype:`).
    pub fn is_change(&self) -> bool {
        !matches!(self.body, LdifBody::Content(_))
    }

    /// The attributes of a content or add record (values of one attribute in file order); empty
    /// for other records.
    pub fn attributes(&self) -> Attributes {
        match &self.body {
            LdifBody::Content(v) | LdifBody::Add(v) => collect_attributes(v),
            _ => Attributes::new(),
        }
    }

    /// The change a change record describes, in model terms (`None` for a content record).
    pub fn to_change(&self) -> Option<LdifChange> {
        Some(match &self.body {
            LdifBody::Content(_) => return None,
            LdifBody::Add(v) => LdifChange::Add(collect_attributes(v)),
            LdifBody::Delete => LdifChange::Delete,
            LdifBody::Modify(mods) => LdifChange::Modify(
                mods.iter()
                    .map(|m| {
                        let values: crate::model::Values =
                            m.values.iter().map(|v| v.value.clone()).collect();
                        match m.op {
                            ChangeOp::Add => AttributeChange::add(m.attribute.clone(), values),
                            ChangeOp::Remove => {
                                AttributeChange::remove(m.attribute.clone(), values)
                            }
                            ChangeOp::Replace => {
                                AttributeChange::replace(m.attribute.clone(), values)
                            }
                        }
                    })
                    .collect(),
            ),
            LdifBody::ModDn(m) => LdifChange::ModDn(m.clone()),
        })
    }
}

fn collect_attributes(values: &[LdifValue]) -> Attributes {
    let mut out = Attributes::new();
    for v in values {
        out.add(v.attribute.clone(), v.value.clone());
    }
    out
}

impl fmt::Display for LdifControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.oid, self.critical)
    }
}

/// The attribute type of an attribute description: `cn;lang-en` → `cn`.
pub(crate) fn base_name(attribute: &str) -> &str {
    attribute.split(';').next().unwrap_or(attribute)
}

#[cfg(test)]
mod tests {
}
