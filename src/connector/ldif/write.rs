//! The RFC 2849 writer: deterministic output, Base64 where the SAFE-STRING rules require it,
//! lines folded at 76 columns.
//!
//! It writes only to the `Write` it is given. Output is pure ASCII: every value that is not a
//! SAFE-STRING (non-ASCII, NUL, CR, LF, a leading space, `:` or `<`, a trailing space) and every
//! [`Value::Bytes`] is written as Base64.

use std::io::{self, Write};

use base64::Engine as _;

use super::{LdifBody, LdifChange, LdifControl, LdifRecord, LdifValue, ModDn};
use crate::model::{AttrName, AttributeChange, Attributes, ChangeOp, Dn, Reference, Value};

/// The longest physical line written.
const WIDTH: usize = 76;

/// Writes LDIF records to `out`: `version: 1`, then the records separated by blank lines.
///
/// A file holds content records or change records, never both (RFC 2849): writing the other kind
/// after the first record is an [`io::ErrorKind::InvalidInput`] error, as are attribute names
/// that are not valid attribute descriptions and references by anchor (which have no DN).
///
/// ```
/// use dirsync::connector::ldif::LdifWriter;
/// use dirsync::model::{Attributes, Dn, Values};
/// let mut w = LdifWriter::new(Vec::new());
/// let attrs: Attributes = [("cn", Values::one("Ada")), ("sn", Values::one(" Lovelace"))]
///     .into_iter()
///     .collect();
/// w.write_entry(&Dn::parse("cn=Ada,dc=example").unwrap(), &attrs)?;
/// let text = String::from_utf8(w.finish()?).unwrap();
/// assert_eq!(text, "version: 1\n\ndn: cn=Ada,dc=example\ncn: Ada\nsn:: IExvdmVsYWNl\n");
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct LdifWriter<W: Write> {
    out: W,
    /// Whether the first record is written, and whether it was a change record.
    changes: Option<bool>,
    line: String,
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// Whether `b` must be written as Base64 (it is not an RFC 2849 SAFE-STRING).
pub(crate) fn needs_base64(b: &[u8]) -> bool {
    matches!(b.first(), Some(b' ' | b':' | b'<'))
        || b.last() == Some(&b' ')
        || b.iter().any(|c| matches!(c, 0 | b'\r' | b'\n' | 0x80..))
}

pub(crate) fn valid_description(name: &str) -> bool {
    let mut parts = name.split(';');
    let ty = parts.next().unwrap_or("");
    let type_ok = match ty.as_bytes().first() {
        Some(b) if b.is_ascii_alphabetic() => {
            ty.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        }
        Some(b) if b.is_ascii_digit() => ty
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit())),
        _ => false,
    };
    type_ok
        && parts.all(|o| !o.is_empty() && o.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'))
}

/// Checks that `name: value` can be written (before any line of a record is).
fn check(name: &AttrName, value: &Value) -> io::Result<()> {
    if !valid_description(name.as_str()) || name.is("dn") {
        return Err(invalid(format!(
            "{:?} is not an attribute description LDIF can carry",
            name.as_str()
        )));
    }
    if let Value::Reference(r @ (Reference::Anchor(_) | Reference::Pending(_))) = value {
        return Err(invalid(format!(
            "attribute {name}: the reference {r} has no DN to write"
        )));
    }
    Ok(())
}

impl<W: Write> LdifWriter<W> {
    /// A writer to `out`.
    pub fn new(out: W) -> LdifWriter<W> {
        LdifWriter {
            out,
            changes: None,
            line: String::new(),
        }
    }

    /// Writes a content record.
    pub fn write_entry(&mut self, dn: &Dn, attributes: &Attributes) -> io::Result<()> {
        if attributes.is_empty() {
            return Err(invalid(format!(
                "the entry {dn} has no attributes; an LDIF content record needs one"
            )));
        }
        // `changetype:` or `control:` right after the DN would make this a change record: write
        // such attributes after the others.
        let special = |n: &AttrName| n.is("changetype") || n.is("control");
        if attributes.iter().all(|(n, _)| special(n)) {
            return Err(invalid(format!(
                "the entry {dn} has only `changetype`/`control` attributes, which would read \
                 back as a change record"
            )));
        }
        let ordered = attributes
            .iter()
            .filter(|(n, _)| !special(n))
            .chain(attributes.iter().filter(|(n, _)| special(n)));
        let mut body = Vec::new();
        for (name, values) in ordered {
            for v in values {
                check(name, v)?;
                body.push((name, v));
            }
        }
        self.begin(false, dn, &[])?;
        for (name, v) in body {
            self.value_line(name, v)?;
        }
        Ok(())
    }

    /// Writes a change record.
    pub fn write_change(&mut self, dn: &Dn, change: &LdifChange) -> io::Result<()> {
        self.change_record(dn, &[], change)
    }

    /// Writes a record as read by [`LdifReader`](super::LdifReader), controls included.
    pub fn write_record(&mut self, record: &LdifRecord) -> io::Result<()> {
        let values = |v: &[LdifValue]| {
            let mut a = Attributes::new();
            for x in v {
                a.add(x.attribute.clone(), x.value.clone());
            }
            a
        };
        match &record.body {
            LdifBody::Content(v) => {
                if !record.controls.is_empty() {
                    return Err(invalid("controls belong to change records".into()));
                }
                self.write_entry(&record.dn, &values(v))
            }
            _ => match record.to_change() {
                Some(c) => self.change_record(&record.dn, &record.controls, &c),
                None => Err(invalid("not a change record".into())),
            },
        }
    }

    /// Ends the output (writing `version: 1` if no record was written) and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        if self.changes.is_none() {
            self.out.write_all(b"version: 1\n")?;
        }
        self.out.flush()?;
        Ok(self.out)
    }

    fn change_record(
        &mut self,
        dn: &Dn,
        controls: &[LdifControl],
        change: &LdifChange,
    ) -> io::Result<()> {
        // Validate everything before writing a byte of the record.
        match change {
            LdifChange::Add(a) if a.is_empty() => {
                return Err(invalid(format!(
                    "`changetype: add` of {dn} needs attributes"
                )))
            }
            LdifChange::Add(a) => {
                for (name, values) in a.iter() {
                    for v in values {
                        check(name, v)?;
                    }
                }
            }
            LdifChange::Modify(changes) => {
                for c in changes {
                    check(&c.attribute, &Value::Boolean(true))?;
                    for v in &c.values {
                        check(&c.attribute, v)?;
                    }
                }
            }
            _ => {}
        }
        self.begin(true, dn, controls)?;
        match change {
            LdifChange::Add(attrs) => {
                self.raw_line("changetype", b"add")?;
                for (name, values) in attrs.iter() {
                    for v in values {
                        self.value_line(name, v)?;
                    }
                }
            }
            LdifChange::Delete => self.raw_line("changetype", b"delete")?,
            LdifChange::Modify(changes) => {
                self.raw_line("changetype", b"modify")?;
                for c in changes {
                    self.modification(c)?;
                }
            }
            LdifChange::ModDn(ModDn {
                new_rdn,
                delete_old_rdn,
                new_superior,
            }) => {
                self.raw_line("changetype", b"modrdn")?;
                self.raw_line("newrdn", new_rdn.to_string().as_bytes())?;
                self.raw_line("deleteoldrdn", if *delete_old_rdn { b"1" } else { b"0" })?;
                if let Some(s) = new_superior {
                    self.raw_line("newsuperior", s.as_str().as_bytes())?;
                }
            }
        }
        Ok(())
    }

    fn modification(&mut self, c: &AttributeChange) -> io::Result<()> {
        let op = match c.op {
            ChangeOp::Add => "add",
            ChangeOp::Remove => "delete",
            ChangeOp::Replace => "replace",
        };
        self.raw_line(op, c.attribute.as_str().as_bytes())?;
        for v in &c.values {
            self.value_line(&c.attribute, v)?;
        }
        self.out.write_all(b"-\n")
    }

    /// Starts a record: the version line or the separating blank line, the DN and controls.
    fn begin(&mut self, change: bool, dn: &Dn, controls: &[LdifControl]) -> io::Result<()> {
        match self.changes {
            None => {
                self.out.write_all(b"version: 1\n\n")?;
                self.changes = Some(change);
            }
            Some(c) if c != change => {
                return Err(invalid(format!(
                    "cannot write a {} record for {dn} into a file of {} records (RFC 2849)",
                    if change { "change" } else { "content" },
                    if c { "change" } else { "content" },
                )))
            }
            Some(_) => self.out.write_all(b"\n")?,
        }
        self.raw_line("dn", dn.as_str().as_bytes())?;
        for c in controls {
            let mut text = format!("{} {}", c.oid, c.critical);
            if let Some(v) = &c.value {
                if needs_base64(v) {
                    text.push_str(":: ");
                    text.push_str(&base64::engine::general_purpose::STANDARD.encode(v));
                } else {
                    text.push_str(": ");
                    // Safe values are ASCII.
                    text.push_str(std::str::from_utf8(v).unwrap_or(""));
                }
            }
            self.raw_line("control", text.as_bytes())?;
        }
        Ok(())
    }

    fn value_line(&mut self, name: &AttrName, value: &Value) -> io::Result<()> {
        check(name, value)?;
        match value {
            Value::String(s) => self.raw_line(name.as_str(), s.as_bytes()),
            Value::Bytes(b) => self.base64_line(name.as_str(), b),
            Value::Reference(Reference::Dn(d)) => {
                self.raw_line(name.as_str(), d.as_str().as_bytes())
            }
            Value::Reference(Reference::Target(t)) => {
                self.raw_line(name.as_str(), t.as_str().as_bytes())
            }
            Value::Reference(_) => Ok(()), // refused by `check`
            other => self.raw_line(name.as_str(), other.to_text().as_bytes()),
        }
    }

    /// `name: value`, or `name:: base64` when the value is not safe.
    fn raw_line(&mut self, name: &str, value: &[u8]) -> io::Result<()> {
        if needs_base64(value) {
            return self.base64_line(name, value);
        }
        self.line.clear();
        self.line.push_str(name);
        self.line.push(':');
        if !value.is_empty() {
            self.line.push(' ');
            // Safe values are ASCII.
            self.line.push_str(std::str::from_utf8(value).unwrap_or(""));
        }
        self.flush_line()
    }

    fn base64_line(&mut self, name: &str, value: &[u8]) -> io::Result<()> {
        self.line.clear();
        self.line.push_str(name);
        self.line.push_str("::");
        if !value.is_empty() {
            self.line.push(' ');
            base64::engine::general_purpose::STANDARD.encode_string(value, &mut self.line);
        }
        self.flush_line()
    }

    /// Writes the pending line folded at [`WIDTH`] (the line is ASCII, so any cut is safe).
    fn flush_line(&mut self) -> io::Result<()> {
        let mut rest = self.line.as_bytes();
        let mut width = WIDTH;
        let mut first = true;
        while first || !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rest.len().min(width));
            if !first {
                self.out.write_all(b" ")?;
            }
            self.out.write_all(chunk)?;
            self.out.write_all(b"\n")?;
            rest = tail;
            width = WIDTH - 1;
            first = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{values, Rdn, Values};

    fn dn(s: &str) -> Dn {
        Dn::parse(s).unwrap()
    }

    fn text(f: impl FnOnce(&mut LdifWriter<Vec<u8>>) -> io::Result<()>) -> String {
        let mut w = LdifWriter::new(Vec::new());
        f(&mut w).unwrap();
        String::from_utf8(w.finish().unwrap()).unwrap()
    }

    #[test]
    fn unsafe_values_are_base64() {
        for (v, b64) in [
            (" lead", true),
            ("trail ", true),
            (":colon", true),
            ("<lt", true),
            ("é", true),
            ("a\nb", true),
            ("a\rb", true),
            ("a\0b", true),
            ("in:side<ok", false),
            ("a b", false),
            ("", false),
        ] {
            assert_eq!(needs_base64(v.as_bytes()), b64, "{v:?}");
        }
        let out = text(|w| {
            w.write_entry(
                &dn("cn=é"),
                &[("cn", values(["é"])), ("x", values([""]))]
                    .into_iter()
                    .collect(),
            )
        });
        assert_eq!(out, "version: 1\n\ndn:: Y249w6k=\ncn:: w6k=\nx:\n");
    }

    #[test]
    fn long_lines_fold_at_76() {
        let long = "x".repeat(200);
        let out = text(|w| {
            w.write_entry(
                &dn("cn=a"),
                &[("description", values([long.as_str()]))]
                    .into_iter()
                    .collect(),
            )
        });
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines.iter().all(|l| l.len() <= 76), "{out}");
        assert_eq!(lines[3].len(), 76);
        assert!(lines[4].starts_with(' '));
        let back = super::super::parse_str(&out).unwrap();
        assert_eq!(
            back[0].attributes().first_str("description"),
            Some(long.as_str())
        );
    }

    #[test]
    fn changes_are_written_in_rfc_form() {
        let out = text(|w| {
            w.write_change(
                &dn("cn=a,dc=x"),
                &LdifChange::Modify(vec![
                    AttributeChange::add("member", Values::one(Value::dn_ref(dn("cn=b,dc=x")))),
                    AttributeChange::remove("description", Values::new()),
                    AttributeChange::replace("mail", values(["a@x", "b@x"])),
                ]),
            )?;
            w.write_change(
                &dn("cn=a,dc=x"),
                &LdifChange::ModDn(ModDn {
                    new_rdn: Rdn::new("cn", "b"),
                    delete_old_rdn: true,
                    new_superior: Some(dn("ou=y,dc=x")),
                }),
            )?;
            w.write_change(&dn("cn=b,ou=y,dc=x"), &LdifChange::Delete)
        });
        assert_eq!(
            out,
            "version: 1\n\ndn: cn=a,dc=x\nchangetype: modify\nadd: member\nmember: cn=b,dc=x\n-\n\
             delete: description\n-\nreplace: mail\nmail: a@x\nmail: b@x\n-\n\n\
             dn: cn=a,dc=x\nchangetype: modrdn\nnewrdn: cn=b\ndeleteoldrdn: 1\nnewsuperior: ou=y,dc=x\n\n\
             dn: cn=b,ou=y,dc=x\nchangetype: delete\n"
        );
    }

    #[test]
    fn invalid_input_is_refused() {
        let mut w = LdifWriter::new(Vec::new());
        let e = w.write_entry(&dn("cn=a"), &Attributes::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let bad: Attributes = [("c n", values(["x"]))].into_iter().collect();
        assert!(w.write_entry(&dn("cn=a"), &bad).is_err());
        let anchor: Attributes = [("member", Values::one(Value::anchor_ref("g1")))]
            .into_iter()
            .collect();
        assert!(w.write_entry(&dn("cn=a"), &anchor).is_err());
        let only: Attributes = [("changetype", values(["add"]))].into_iter().collect();
        assert!(w.write_entry(&dn("cn=a"), &only).is_err());
        let ok: Attributes = [("cn", values(["a"]))].into_iter().collect();
        w.write_entry(&dn("cn=a"), &ok).unwrap();
        assert!(w.write_change(&dn("cn=a"), &LdifChange::Delete).is_err());
        // Refused records leave no partial output behind.
        let out = String::from_utf8(w.finish().unwrap()).unwrap();
        assert_eq!(out, "version: 1\n\ndn: cn=a\ncn: a\n");
    }

    #[test]
    fn changetype_attribute_of_an_entry_is_written_last() {
        let a: Attributes = [("changetype", values(["x"])), ("cn", values(["a"]))]
            .into_iter()
            .collect();
        let out = text(|w| w.write_entry(&dn("cn=a"), &a));
        assert_eq!(out, "version: 1\n\ndn: cn=a\ncn: a\nchangetype: x\n");
        assert_eq!(super::super::parse_str(&out).unwrap()[0].attributes(), a);
    }

    #[test]
    fn other_values_are_written_as_text() {
        let a: Attributes = [
            ("n", Values::one(42i64)),
            ("b", Values::one(true)),
            ("m", Values::one(Value::target_ref("cn=g,dc=x"))),
            ("p", Values::one(Value::Bytes(b"abc".to_vec()))),
        ]
        .into_iter()
        .collect();
        let out = text(|w| w.write_entry(&dn("cn=a"), &a));
        assert_eq!(
            out,
            "version: 1\n\ndn: cn=a\nb: TRUE\nm: cn=g,dc=x\nn: 42\np:: YWJj\n"
        );
    }
}
