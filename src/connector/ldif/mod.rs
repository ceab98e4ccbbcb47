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

mod index;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::dirnames::base_name;
    use crate::model::{values, Anchor, Entry, Reference, Values};
    use proptest::prelude::*;

    const EXAMPLE_1: &str = "version: 1
dn: cn=Barbara Jensen, ou=Product Development, dc=airius, dc=com
objectclass: top
objectclass: person
objectclass: organizationalPerson
cn: Barbara Jensen
cn: Barbara J Jensen
cn: Babs Jensen
sn: Jensen
uid: bjensen
telephonenumber: +1 408 555 1212
description: A big sailing fan.

dn: cn=Bjorn Jensen, ou=Accounting, dc=airius, dc=com
objectclass: top
objectclass: person
objectclass: organizationalPerson
cn: Bjorn Jensen
sn: Jensen
telephonenumber: +1 408 555 1212
";

    const EXAMPLE_2: &str = "version: 1
dn:cn=Barbara Jensen, ou=Product Development, dc=airius, dc=com
objectclass:top
objectclass:person
objectclass:organizationalPerson
cn:Barbara Jensen
cn:Barbara J Jensen
cn:Babs Jensen
sn:Jensen
uid:bjensen
telephonenumber:+1 408 555 1212
description:Babs is a big sailing fan, and travels extensively in sea
 rch of perfect sailing conditions.
title:Product Manager, Rod and Reel Division
";

    const EXAMPLE_3: &str = "version: 1
dn: cn=Gern Jensen, ou=Product Testing, dc=airius, dc=com
objectclass: top
objectclass: person
objectclass: organizationalPerson
cn: Gern Jensen
cn: Gern O Jensen
sn: Jensen
uid: gernj
telephonenumber: +1 408 555 1212
description:: V2hhdCBhIGNhcmVmdWwgcmVhZGVyIHlvdSBhcmUhICBUaGlzIHZhbHVlIGlzIGJhc2UtNjQtZW5jb2RlZCBiZWNhdXNlIGl0IGhhcyBhIGNvbnRyb2wgY2hhcmFjdGVyIGluIGl0IChhIENSKS4NICBCeSB0aGUgd2F5LCB5b3Ugc2hvdWxkIHJlYWxseSBnZXQgb3V0IG1vcmUu
";

    const EXAMPLE_4: &str = "version: 1
dn:: b3U95Za25qWt6YOoLG89QWlyaXVz
# dn:: ou=<JapaneseOU>,o=Airius
objectclass: top
objectclass: organizationalUnit
ou:: 5Za25qWt6YOo
# ou:: <JapaneseOU>
ou;lang-ja:: 5Za25qWt6YOo
# ou;lang-ja:: <JapaneseOU>
ou;lang-ja;phonetic:: 44GI44GE44GO44KH44GG44G2
# ou;lang-ja:: <JapaneseOU_in_phonetic_representation>
ou;lang-en: Sales
description: Japanese office

dn:: dWlkPXJvZ2FzYXdhcmEsb3U95Za25qWt6YOoLG89QWlyaXVz
# dn:: uid=<uid>,ou=<JapaneseOU>,o=Airius
userpassword: {SHA}O3HSv1MusyL4kTjP+HKI5uxuNoM=
objectclass: top
objectclass: person
objectclass: organizationalPerson
objectclass: inetOrgPerson
uid: rogasawara
mail: rogasawara@airius.co.jp
givenname;lang-ja:: 44Ot44OJ44OL44O8
# givenname;lang-ja:: <JapaneseGivenname>
sn;lang-ja:: 5bCP56yg5Y6f
# sn;lang-ja:: <JapaneseSn>
cn;lang-ja:: 5bCP56yg5Y6fIOODreODieODi+ODvA==
# cn;lang-ja:: <JapaneseCn>
title;lang-ja:: 5Za25qWt6YOoIOmDqOmVtw==
# title;lang-ja:: <JapaneseTitle>
preferredlanguage: ja
givenname;lang-en: Rodney
sn;lang-en: Ogasawara
cn;lang-en: Rodney Ogasawara
title;lang-en: Sales, Director
";

    const EXAMPLE_5: &str = "version: 1
dn: cn=Horatio Jensen, ou=Product Testing, dc=airius, dc=com
objectclass: top
objectclass: person
objectclass: organizationalPerson
cn: Horatio Jensen
cn: Horatio N Jensen
sn: Jensen
uid: hjensen
telephonenumber: +1 408 555 1212
jpegphoto:< file:///usr/local/directory/photos/hjensen.jpg
";

    const EXAMPLE_6: &str = "version: 1
# Add a new entry
dn: cn=Fiona Jensen, ou=Marketing, dc=airius, dc=com
changetype: add
objectclass: top
objectclass: person
objectclass: organizationalPerson
cn: Fiona Jensen
sn: Jensen
uid: fiona
telephonenumber: +1 408 555 1212
jpegphoto:< file:///usr/local/directory/photos/fiona.jpg

# Delete an existing entry
dn: cn=Robert Jensen, ou=Marketing, dc=airius, dc=com
changetype: delete

# Modify an entry's relative distinguished name
dn: cn=Paul Jensen, ou=Product Development, dc=airius, dc=com
changetype: modrdn
newrdn: cn=Paula Jensen
deleteoldrdn: 1

# Rename an entry and move all of its children to a new location in
# the directory tree (only implemented by LDAPv3 servers).
dn: ou=PD Accountants, ou=Product Development, dc=airius, dc=com
changetype: modrdn
newrdn: ou=Product Development Accountants
deleteoldrdn: 0
newsuperior: ou=Accounting, dc=airius, dc=com

# Modify an entry: add an additional value to the postaladdress
# attribute, completely delete the description attribute, replace
# the telephonenumber attribute with two values, and delete a specific
# value from the facsimiletelephonenumber attribute
dn: cn=Paula Jensen, ou=Product Development, dc=airius, dc=com
changetype: modify
add: postaladdress
postaladdress: 123 Anystreet $ Sunnyvale, CA $ 94086
-
delete: description
-
replace: telephonenumber
telephonenumber: +1 408 555 1234
telephonenumber: +1 408 555 5678
-
delete: facsimiletelephonenumber
facsimiletelephonenumber: +1 408 555 9876
-

# Modify an entry: replace the postaladdress attribute with an empty
# set of values (which will cause the attribute to be removed), and
# delete the entire description attribute. Note that the first will
# always succeed, while the second will only succeed if at least
# one value for the description attribute is present.
dn: cn=Ingrid Jensen, ou=Product Support, dc=airius, dc=com
changetype: modify
replace: postaladdress
-
delete: description
-
";

    const EXAMPLE_7: &str = "version: 1
# Delete an entry. The operation will attach the LDAPv3
# Tree Delete Control defined in [9]. The criticality
# field is \"true\" and the controlValue field is
# absent, as required by [9].
dn: ou=Product Development, dc=airius, dc=com
control: 1.2.840.113556.1.4.805 true
changetype: delete
";

    fn dn(s: &str) -> Dn {
        Dn::parse(s).unwrap()
    }

    #[test]
    fn rfc_example_1_two_entries() {
        let r = parse_str(EXAMPLE_1).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].line, r[1].line), (2, 14));
        assert_eq!(
            r[0].dn,
            dn("cn=Barbara Jensen,ou=Product Development,dc=airius,dc=com")
        );
        let a = r[0].attributes();
        assert_eq!(a.get("cn").unwrap().len(), 3);
        assert_eq!(a.first_str("telephoneNumber"), Some("+1 408 555 1212"));
        assert_eq!(a.get("objectClass").unwrap().len(), 3);
        assert_eq!(r[1].attributes().first_str("cn"), Some("Bjorn Jensen"));
    }

    #[test]
    fn rfc_example_2_folded_value_and_no_fill() {
        let r = parse_str(EXAMPLE_2).unwrap();
        let a = r[0].attributes();
        assert_eq!(
            a.first_str("description"),
            Some("Babs is a big sailing fan, and travels extensively in search of perfect sailing conditions.")
        );
        assert_eq!(
            a.first_str("title"),
            Some("Product Manager, Rod and Reel Division")
        );
        assert_eq!(
            r[0].dn,
            dn("cn=Barbara Jensen,ou=Product Development,dc=airius,dc=com")
        );
    }

    #[test]
    fn rfc_example_3_base64_value_with_a_cr() {
        let r = parse_str(EXAMPLE_3).unwrap();
        let d = r[0]
            .attributes()
            .first_str("description")
            .unwrap()
            .to_owned();
        assert!(d.starts_with("What a careful reader you are!"));
        assert!(d.contains("(a CR).\r  By the way"));
        // Written back, the CR forces Base64 again and the text round-trips.
        let mut w = LdifWriter::new(Vec::new());
        w.write_entry(&r[0].dn, &r[0].attributes()).unwrap();
        let out = String::from_utf8(w.finish().unwrap()).unwrap();
        assert!(out.contains("description:: V2hhdCBh"));
        assert_eq!(parse_str(&out).unwrap()[0].attributes(), r[0].attributes());
    }

    #[test]
    fn rfc_example_4_utf8_and_language_options() {
        let r = parse_str(EXAMPLE_4).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].dn.as_str(), "ou=営業部,o=Airius");
        assert_eq!(r[1].dn.parent().unwrap(), r[0].dn);
        let a = r[0].attributes();
        assert_eq!(a.first_str("ou"), Some("営業部"));
        assert_eq!(a.first_str("ou;lang-ja;phonetic"), Some("えいぎょうぶ"));
        assert_eq!(a.first_str("ou;lang-en"), Some("Sales"));
        let b = r[1].attributes();
        assert_eq!(b.first_str("cn;lang-ja"), Some("小笠原 ロドニー"));
        assert_eq!(b.first_str("title;lang-ja"), Some("営業部 部長"));
        assert_eq!(
            b.first_str("userpassword"),
            Some("{SHA}O3HSv1MusyL4kTjP+HKI5uxuNoM=")
        );
        // The second record's first value line comes after a comment line.
        let LdifBody::Content(v) = &r[1].body else {
            panic!()
        };
        assert_eq!((r[1].line, v[0].line), (15, 17));
    }

    #[test]
    fn rfc_example_5_url_values_are_refused() {
        let e = parse_str(EXAMPLE_5).unwrap_err();
        assert_eq!((e.line, e.column), (11, Some(13)));
        assert!(e.message.contains("not supported"), "{e}");
    }

    #[test]
    fn rfc_example_6_change_records() {
        let e = parse_str(EXAMPLE_6).unwrap_err();
        assert_eq!(e.line, 12, "the jpegphoto URL line");
        let text = EXAMPLE_6.replace(
            "jpegphoto:< file:///usr/local/directory/photos/fiona.jpg",
            "jpegphoto:: /9j/4A==",
        );
        let r = parse_str(&text).unwrap();
        assert_eq!(r.len(), 6);
        assert!(r.iter().all(LdifRecord::is_change));
        let LdifBody::Add(add) = &r[0].body else {
            panic!()
        };
        assert_eq!(add.len(), 8);
        assert_eq!(add[7].value, Value::Bytes(vec![0xff, 0xd8, 0xff, 0xe0]));
        assert_eq!((r[1].line, &r[1].body), (15, &LdifBody::Delete));
        let LdifBody::ModDn(m) = &r[2].body else {
            panic!()
        };
        assert!(m.delete_old_rdn && m.new_superior.is_none());
        assert_eq!(
            m.new_dn(&r[2].dn).unwrap(),
            dn("cn=Paula Jensen,ou=Product Development,dc=airius,dc=com")
        );
        let LdifBody::ModDn(m) = &r[3].body else {
            panic!()
        };
        assert!(!m.delete_old_rdn);
        assert_eq!(
            m.new_dn(&r[3].dn).unwrap(),
            dn("ou=Product Development Accountants,ou=Accounting,dc=airius,dc=com")
        );
        let Some(LdifChange::Modify(changes)) = r[4].to_change() else {
            panic!()
        };
        assert_eq!(
            changes,
            vec![
                AttributeChange::add(
                    "postaladdress",
                    values(["123 Anystreet $ Sunnyvale, CA $ 94086"])
                ),
                AttributeChange::remove("description", Values::new()),
                AttributeChange::replace(
                    "telephonenumber",
                    values(["+1 408 555 1234", "+1 408 555 5678"])
                ),
                AttributeChange::remove("facsimiletelephonenumber", values(["+1 408 555 9876"])),
            ]
        );
        let Some(LdifChange::Modify(changes)) = r[5].to_change() else {
            panic!()
        };
        assert_eq!(
            changes,
            vec![
                AttributeChange::replace("postaladdress", Values::new()),
                AttributeChange::remove("description", Values::new()),
            ]
        );
        // Writing the records and reading them back gives the same records (lines aside).
        let mut w = LdifWriter::new(Vec::new());
        for rec in &r {
            w.write_record(rec).unwrap();
        }
        let out = String::from_utf8(w.finish().unwrap()).unwrap();
        let back = parse_str(&out).unwrap();
        let changes = |rs: &[LdifRecord]| {
            rs.iter()
                .map(|x| (x.dn.clone(), x.to_change()))
                .collect::<Vec<_>>()
        };
        assert_eq!(changes(&back), changes(&r));
    }

    #[test]
    fn rfc_example_7_control() {
        let r = parse_str(EXAMPLE_7).unwrap();
        assert_eq!(r[0].controls.len(), 1);
        assert_eq!(r[0].controls[0].oid, "1.2.840.113556.1.4.805");
        assert!(r[0].controls[0].critical);
        let mut w = LdifWriter::new(Vec::new());
        w.write_record(&r[0]).unwrap();
        let out = String::from_utf8(w.finish().unwrap()).unwrap();
        assert!(out.contains("control: 1.2.840.113556.1.4.805 true\n"));
        assert_eq!(parse_str(&out).unwrap()[0].controls, r[0].controls);
    }

    fn attr_name() -> impl Strategy<Value = String> {
        "[a-zA-Z][a-zA-Z0-9-]{0,8}(;[a-z0-9-]{1,4}){0,2}"
            .prop_filter("not dn", |n| !base_name(n).eq_ignore_ascii_case("dn"))
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            "\\PC{0,40}".prop_map(Value::from),
            "[ :<a-z]{0,3}[ \\t\\r\\n\\x00a-zé€😀]{0,12}[ a]{0,3}".prop_map(Value::from),
            "[a-z ]{60,200}".prop_map(Value::from),
            proptest::collection::vec(any::<u8>(), 0..120).prop_map(Value::Bytes),
        ]
    }

    fn attributes() -> impl Strategy<Value = Attributes> {
        proptest::collection::vec(
            (attr_name(), proptest::collection::vec(value(), 1..4)),
            1..6,
        )
        .prop_map(|v| v.into_iter().map(|(n, vs)| (n, Values::from(vs))).collect())
    }

    fn a_dn() -> impl Strategy<Value = Dn> {
        ("\\PC{1,20}", "[a-z]{1,8}").prop_map(|(cn, dc)| {
            Dn::from_rdns([
                crate::model::Rdn::new("cn", &cn),
                crate::model::Rdn::new("dc", &dc),
            ])
        })
    }

    /// What reading gives back for a written value: bytes that are UTF-8 read as text.
    fn as_read(a: &Attributes) -> Attributes {
        a.iter()
            .map(|(n, vs)| {
                let vs: Values = vs
                    .iter()
                    .map(|v| match v {
                        Value::Bytes(b) => match std::str::from_utf8(b) {
                            Ok(s) => Value::from(s),
                            Err(_) => v.clone(),
                        },
                        other => other.clone(),
                    })
                    .collect();
                (n.clone(), vs)
            })
            .collect()
    }

    proptest! {
        #[test]
        fn written_entries_read_back_the_same(entries in proptest::collection::vec((a_dn(), attributes()), 1..4)) {
            let mut w = LdifWriter::new(Vec::new());
            for (d, a) in &entries {
                w.write_entry(d, a).unwrap();
            }
            let out = w.finish().unwrap();
            let text = String::from_utf8(out.clone()).unwrap();
            prop_assert!(text.lines().all(|l| l.len() <= 76 && l.is_ascii()), "{}", text);
            let back = LdifReader::new(&out[..]).collect::<Result<Vec<_>, _>>();
            let back = match back { Ok(b) => b, Err(e) => return Err(TestCaseError::fail(format!("{e}\n{text}"))) };
            prop_assert_eq!(back.len(), entries.len());
            for ((d, a), r) in entries.iter().zip(&back) {
                prop_assert_eq!(r.dn.as_str(), d.as_str());
                prop_assert_eq!(r.attributes(), as_read(a));
            }
            // Deterministic: what was read, written twice over, gives the same bytes.
            let rewrite = |records: &[LdifRecord]| {
                let mut w = LdifWriter::new(Vec::new());
                for r in records {
                    w.write_entry(&r.dn, &r.attributes()).unwrap();
                }
                w.finish().unwrap()
            };
            let out2 = rewrite(&back);
            let back2 = parse_str(std::str::from_utf8(&out2).unwrap()).unwrap();
            prop_assert_eq!(rewrite(&back2), out2);
        }

        #[test]
        fn written_changes_read_back_the_same(
            d in a_dn(),
            mods in proptest::collection::vec((attr_name(), 0..3u8, proptest::collection::vec(value(), 0..3)), 0..5),
        ) {
            let changes: Vec<AttributeChange> = mods
                .into_iter()
                .map(|(n, op, vs)| {
                    let vs = as_read(&[(n.as_str(), Values::from(vs.clone()))].into_iter().collect())
                        .get(&n)
                        .cloned()
                        .unwrap_or_default();
                    match op {
                        0 => AttributeChange::add(n, vs),
                        1 => AttributeChange::remove(n, vs),
                        _ => AttributeChange::replace(n, vs),
                    }
                })
                .collect();
            let mut w = LdifWriter::new(Vec::new());
            w.write_change(&d, &LdifChange::Modify(changes.clone())).unwrap();
            let out = String::from_utf8(w.finish().unwrap()).unwrap();
            let back = parse_str(&out).unwrap();
            prop_assert_eq!(back[0].to_change(), Some(LdifChange::Modify(changes)));
        }

        /// Entry level: a model entry written as LDIF and mapped back by the source mapping is
        /// the same entry (binary attributes stay bytes, references stay DN references).
        #[test]
        fn model_entries_round_trip_through_the_mapping(
            d in a_dn(),
            uuid in any::<u128>(),
            photo in proptest::collection::vec(any::<u8>(), 0..80),
            members in proptest::collection::vec(a_dn(), 0..4),
            others in attributes(),
        ) {
            let anchor = Anchor::from_guid(uuid::Uuid::from_u128(uuid));
            let mut entry = Entry::new(anchor.clone(), "group")
                .with_dn(d.clone())
                .with("entryUUID", anchor.as_str())
                .with("objectClass", "top")
                .with("objectClass", "groupOfNames")
                .with("jpegPhoto", Value::Bytes(photo));
            for m in members {
                entry.attributes.add("member", Value::dn_ref(m));
            }
            for (n, vs) in others.iter() {
                let special = ["entryUUID", "objectClass", "jpegPhoto", "member", "objectGUID",
                    "objectSid", "thumbnailPhoto", "userCertificate", "manager", "uniqueMember", "memberOf"]
                    .iter()
                    .any(|s| base_name(n.as_str()).eq_ignore_ascii_case(s));
                if !special {
                    entry.attributes.set(n.clone(), as_read(&[(n.clone(), vs.clone())].into_iter().collect()).get(n.as_str()).cloned().unwrap_or_default());
                }
            }
            let mut w = LdifWriter::new(Vec::new());
            w.write_entry(&d, &entry.attributes).unwrap();
            let out = w.finish().unwrap();
            let records = LdifReader::new(&out[..]).collect::<Result<Vec<_>, _>>().unwrap();
            let back = super::LdifSourceConfig::default().to_entry(&records[0]).unwrap().unwrap();
            prop_assert_eq!(back, entry);
        }
    }

    #[test]
    fn references_by_dn_and_target_are_written_as_text() {
        let a: Attributes = [(
            "member",
            Values::one(Value::Reference(Reference::Dn(dn("cn=x,dc=y")))),
        )]
        .into_iter()
        .collect();
        let mut w = LdifWriter::new(Vec::new());
        w.write_entry(&dn("cn=g"), &a).unwrap();
        let out = String::from_utf8(w.finish().unwrap()).unwrap();
        assert!(out.ends_with("member: cn=x,dc=y\n"));
    }
}
