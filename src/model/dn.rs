//! TEMPORARY local placeholder — replaced by branch `dn`; never committed.
#![allow(missing_docs)]
use serde::{Deserialize, Serialize};
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Dn(String);
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rdn(String);
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad dn")]
pub struct DnError;
impl Dn {
    pub fn parse(s: &str) -> Result<Dn, DnError> {
        Ok(Dn(s.to_lowercase()))
    }
    pub fn parent(&self) -> Option<Dn> {
        self.0.split_once(',').map(|(_, p)| Dn(p.to_string()))
    }
    pub fn is_descendant_of(&self, a: &Dn) -> bool {
        self.0.ends_with(&format!(",{}", a.0))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl std::fmt::Display for Dn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::fmt::Debug for Dn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
