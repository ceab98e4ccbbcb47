//! Shared by the examples: [`LdifNames`], a [`Target`] adapter that lets rules written for a SCIM
//! service (attribute paths such as `name.givenName`, `emails[type eq "work"].value` or
//! `urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber`) be exported into
//! an [`LdifTarget`](dirsync::connector::ldif::LdifTarget), whose attribute descriptions may only
//! hold letters, digits and `-`.
//!
//! Names LDIF can carry pass unchanged. Any other name is written `x-dirsync-` followed by the
//! name with every byte other than an ASCII letter or digit as `-` and two hex digits
//! (`name.givenName` → `x-dirsync-name-2egivenName`). The encoding is reversible, so the engine
//! sees its own names in everything the target returns.

use async_trait::async_trait;
use dirsync::connector::{Applied, ConnectorError, Target, TargetCapabilities, TargetOperation};
use dirsync::model::Value;
use dirsync::model::{AttrName, AttributeChange, Attributes, ObjectType, TargetId, TargetObject};
use futures::stream::BoxStream;
use futures::StreamExt;

const PREFIX: &str = "x-dirsync-";

/// Whether LDIF (RFC 2849 / RFC 4512 `descr`) can carry `name` as it is.
fn ldif_safe(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The LDIF spelling of an attribute name.
pub fn encode_name(name: &AttrName) -> AttrName {
    let s = name.as_str();
    if ldif_safe(s) && !s.to_ascii_lowercase().starts_with(PREFIX) {
        return name.clone();
    }
    let mut out = String::from(PREFIX);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("-{b:02x}"));
        }
    }
    AttrName::new(out)
}

/// The engine's spelling of an attribute name read from the file (`None` when it is not a valid
/// encoding).
pub fn decode_name(name: &AttrName) -> Option<AttrName> {
    let s = name.as_str();
    if !s.to_ascii_lowercase().starts_with(PREFIX) {
        return Some(name.clone());
    }
    let rest = s.get(PREFIX.len()..)?.as_bytes();
    let mut out = Vec::with_capacity(rest.len());
    let mut i = 0;
    while let Some(&b) = rest.get(i) {
        if b == b'-' {
            let hex = std::str::from_utf8(rest.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(AttrName::new)
}

fn decode_attributes(attributes: &Attributes) -> Attributes {
    let mut out = Attributes::with_capacity(attributes.len());
    for (name, values) in attributes.iter() {
        let name = decode_name(name).unwrap_or_else(|| name.clone());
        out.set(name, values.clone());
    }
    out
}

fn encode_attributes(attributes: &Attributes) -> Attributes {
    let mut out = Attributes::with_capacity(attributes.len());
    for (name, values) in attributes.iter() {
        out.set(encode_name(name), values.clone());
    }
    out
}

fn decode_object(mut o: TargetObject) -> TargetObject {
    o.attributes = decode_attributes(&o.attributes);
    o
}

/// A target whose attribute names are translated with [`encode_name`] on the way in and
/// [`decode_name`] on the way out.
pub struct LdifNames<T> {
    inner: T,
}

impl<T: Target> LdifNames<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        LdifNames { inner }
    }
}

#[async_trait]
impl<T: Target> Target for LdifNames<T> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn capabilities(&self) -> TargetCapabilities {
        self.inner.capabilities()
    }

    async fn read(
        &self,
        object_type: &ObjectType,
    ) -> Result<BoxStream<'_, Result<TargetObject, ConnectorError>>, ConnectorError> {
        let stream = self.inner.read(object_type).await?;
        Ok(stream.map(|o| o.map(decode_object)).boxed())
    }

    async fn get(
        &self,
        object_type: &ObjectType,
        id: &TargetId,
    ) -> Result<Option<TargetObject>, ConnectorError> {
        Ok(self.inner.get(object_type, id).await?.map(decode_object))
    }

    async fn find(
        &self,
        object_type: &ObjectType,
        attribute: &AttrName,
        value: &Value,
    ) -> Result<Vec<TargetObject>, ConnectorError> {
        let found = self
            .inner
            .find(object_type, &encode_name(attribute), value)
            .await?;
        Ok(found.into_iter().map(decode_object).collect())
    }

    async fn find_any(
        &self,
        object_type: &ObjectType,
        attribute: &AttrName,
        values: &[Value],
    ) -> Result<Vec<TargetObject>, ConnectorError> {
        let found = self
            .inner
            .find_any(object_type, &encode_name(attribute), values)
            .await?;
        Ok(found.into_iter().map(decode_object).collect())
    }

    async fn apply(&self, operations: &[TargetOperation]) -> Vec<Result<Applied, ConnectorError>> {
        let encoded: Vec<TargetOperation> = operations
            .iter()
            .map(|op| match op {
                TargetOperation::Create {
                    object_type,
                    attributes,
                } => TargetOperation::Create {
                    object_type: object_type.clone(),
                    attributes: encode_attributes(attributes),
                },
                TargetOperation::Update {
                    id,
                    object_type,
                    changes,
                } => TargetOperation::Update {
                    id: id.clone(),
                    object_type: object_type.clone(),
                    changes: changes
                        .iter()
                        .map(|c| AttributeChange {
                            attribute: encode_name(&c.attribute),
                            ..c.clone()
                        })
                        .collect(),
                },
                other => other.clone(),
            })
            .collect();
        self.inner.apply(&encoded).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for n in [
            "displayName",
            "name.givenName",
            r#"emails[type eq "work"].value"#,
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber",
            "x-dirsync-trick",
            "a-b",
        ] {
            let name = AttrName::new(n);
            let e = encode_name(&name);
            assert!(ldif_safe(e.as_str()), "{e}");
            assert_eq!(
                decode_name(&e).map(|d| d.as_str().to_owned()),
                Some(n.to_owned())
            );
        }
        assert_eq!(encode_name(&"displayName".into()).as_str(), "displayName");
        assert_eq!(
            encode_name(&"name.givenName".into()).as_str(),
            "x-dirsync-name-2egivenName"
        );
    }
}
