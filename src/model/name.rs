//! Case-insensitive names: attribute names and object types.
//!
//! Directory attribute names compare case-insensitively (`givenName` = `GIVENNAME`) but are
//! written back with the spelling they were first given. Comparison and hashing fold ASCII
//! letters without allocating; other characters fold with Unicode simple lower-casing.
//!
//! Holds the pure modules' one process-wide state: a bounded set of interned configured names
//! (see `intern`), a cache that changes no result.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};
use smol_str::SmolStr;

/// Unicode simple (one-to-one) lower-casing: a character whose lower case is several characters
/// is kept as it is.
fn fold(c: char) -> char {
    let mut lower = c.to_lowercase();
    match (lower.next(), lower.next()) {
        (Some(l), None) => l,
        _ => c,
    }
}

/// Iterates the case-folded characters of `s`.
fn folded(s: &str) -> impl Iterator<Item = char> + '_ {
    s.chars().map(fold)
}

#[inline]
fn ci_eq(a: &str, b: &str) -> bool {
    if a.len() == b.len() {
        if a.as_bytes() == b.as_bytes() {
            return true;
        }
        match ascii_eq_words(a.as_bytes(), b.as_bytes()) {
            Some(true) => return true,
            // Different ASCII names of one length: only non-ASCII text folds across lengths
            // or to ASCII, and there is none.
            Some(false) if a.is_ascii() && b.is_ascii() => return false,
            _ => {}
        }
    } else if a.is_ascii() && b.is_ascii() {
        return false;
    }
    folded(a).eq(folded(b))
}

const HIGH: u64 = 0x8080_8080_8080_8080;
const ONES: u64 = 0x0101_0101_0101_0101;

/// The 8 bytes at `i` of `s` as a little-endian word (`i + 8 <= s.len()`; zero otherwise).
#[inline(always)]
fn word(s: &[u8], i: usize) -> u64 {
    s.get(i..i + 8)
        .and_then(|c| <[u8; 8]>::try_from(c).ok())
        .map_or(0, u64::from_le_bytes)
}

/// ASCII lower-casing of the 8 bytes of `x`, all of which are ASCII.
#[inline(always)]
fn lower_word(x: u64) -> u64 {
    // Per byte b < 0x80: b + (0x80 - 'A') has its high bit set iff b >= 'A', and
    // b + (0x7f - 'Z') iff b > 'Z'; neither sum carries into the next byte.
    let ge_a = x.wrapping_add(ONES * (0x80 - b'A' as u64));
    let gt_z = x.wrapping_add(ONES * (0x7f - b'Z' as u64));
    let upper = ge_a & !gt_z & HIGH;
    x | (upper >> 2)
}

/// How two byte strings compare ignoring ASCII case over their first `n` bytes (`n` at most
/// both lengths), a word at a time; `None` when a differing word holds a non-ASCII byte (the
/// caller then folds the whole strings).
#[inline]
fn ascii_cmp_prefix(x: &[u8], y: &[u8], n: usize) -> Option<Ordering> {
    let cmp_word = |i: usize| -> Option<Ordering> {
        let (p, q) = (word(x, i), word(y, i));
        if p == q {
            return Some(Ordering::Equal);
        }
        if (p | q) & HIGH != 0 {
            return None;
        }
        // Little-endian words: the first differing byte is the lowest one.
        Some(lower_word(p).swap_bytes().cmp(&lower_word(q).swap_bytes()))
    };
    if n < 8 {
        for (p, q) in x[..n].iter().zip(&y[..n]) {
            if p == q {
                continue;
            }
            if !p.is_ascii() || !q.is_ascii() {
                return None;
            }
            match p.to_ascii_lowercase().cmp(&q.to_ascii_lowercase()) {
                Ordering::Equal => {}
                other => return Some(other),
            }
        }
        return Some(Ordering::Equal);
    }
    let mut i = 0;
    while i + 8 <= n {
        match cmp_word(i)? {
            Ordering::Equal => {}
            other => return Some(other),
        }
        i += 8;
    }
    if i < n {
        // The last 8 bytes, overlapping bytes already found equal: the first difference in
        // this window is the first difference of the strings.
        return cmp_word(n - 8);
    }
    Some(Ordering::Equal)
}

/// Whether two byte strings of one length are equal ignoring ASCII case; `None` when a
/// differing word holds a non-ASCII byte.
#[inline]
fn ascii_eq_words(x: &[u8], y: &[u8]) -> Option<bool> {
    ascii_cmp_prefix(x, y, x.len().min(y.len())).map(|o| o == Ordering::Equal)
}

fn ci_cmp(a: &str, b: &str) -> Ordering {
    let (x, y) = (a.as_bytes(), b.as_bytes());
    match ascii_cmp_prefix(x, y, x.len().min(y.len())) {
        None => ci_cmp_bytes(a, b),
        // One is a prefix of the other (ignoring ASCII case); any remainder folds to a
        // non-empty remainder, so the longer is greater.
        Some(Ordering::Equal) => x.len().cmp(&y.len()),
        Some(other) => other,
    }
}

/// [`ci_cmp`] a byte at a time, folding non-ASCII characters.
fn ci_cmp_bytes(a: &str, b: &str) -> Ordering {
    let (x, y) = (a.as_bytes(), b.as_bytes());
    for (p, q) in x.iter().zip(y) {
        if p == q {
            continue;
        }
        if !p.is_ascii() || !q.is_ascii() {
            // Rare: non-ASCII text. Compare the folded characters from the start.
            return folded(a).cmp(folded(b));
        }
        match p.to_ascii_lowercase().cmp(&q.to_ascii_lowercase()) {
            Ordering::Equal => {}
            other => return other,
        }
    }
    // One is a prefix of the other (ignoring ASCII case); any remainder folds to a non-empty
    // remainder, so the longer is greater.
    x.len().cmp(&y.len())
}

fn ci_hash<H: Hasher>(s: &str, state: &mut H) {
    const N: usize = 64;
    if s.len() <= N && s.is_ascii() {
        let mut buf = [0u8; N];
        for (d, b) in buf.iter_mut().zip(s.bytes()) {
            *d = b.to_ascii_lowercase();
        }
        state.write(&buf[..s.len()]);
    } else {
        for c in folded(s) {
            let mut utf8 = [0u8; 4];
            state.write(c.encode_utf8(&mut utf8).as_bytes());
        }
    }
    state.write_u8(0xff);
}

/// The longest name a [`SmolStr`] holds inline (longer ones share a counted heap buffer).
const INLINE_NAME: usize = smol_str::SmolStr::INLINE_CAP;

/// At most this many names are interned in a process; past it, names are made as usual.
const INTERN_CAP: usize = 4096;

/// Interns `s`: the one `'static` copy of this exact spelling, made on first use and kept for
/// the life of the process; `None` once [`INTERN_CAP`] names are held.
///
/// This is the one process-wide state of the pure modules, a deliberate exception: it is a
/// cache that changes no result (an interned name compares, hashes and prints as any other),
/// it is bounded, and it is fed only by configured names — rule target attributes and object
/// types of rule sets that compiled — whose number is set by the rules, not by the data. A
/// compiled rule set copies these names into every object it projects, and a `'static` name
/// is copied without touching a shared reference count (an atomic operation per clone and per
/// drop otherwise).
pub(crate) fn intern(s: &str) -> Option<&'static str> {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock, PoisonError};
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(&known) = names.get(s) {
        return Some(known);
    }
    if names.len() >= INTERN_CAP {
        return None;
    }
    let leaked: &'static str = Box::leak(s.to_owned().into_boxed_str());
    names.insert(leaked);
    Some(leaked)
}

macro_rules! ci_name {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(SmolStr);

        impl $name {
            /// Makes a name; the spelling is kept for output.
            pub fn new(name: impl Into<SmolStr>) -> Self {
                $name(name.into())
            }

            /// A name from a `'static` string: cloning it copies a pointer and never touches a
            /// shared reference count.
            ///
            /// ```
            #[doc = concat!("use dirsync::model::", stringify!($name), ";")]
            #[doc = concat!("const N: ", stringify!($name), " = ", stringify!($name), "::from_static(\"urn:ietf:params:scim:schemas:core:2.0:User\");")]
            #[doc = concat!("assert_eq!(N.clone(), ", stringify!($name), "::new(\"URN:IETF:PARAMS:SCIM:SCHEMAS:CORE:2.0:USER\"));")]
            /// ```
            pub const fn from_static(name: &'static str) -> Self {
                $name(SmolStr::new_static(name))
            }

            /// A name interned for the life of the process (one `'static` copy per spelling,
            /// never freed, at most a few thousand in all): for the configured names a
            /// compiled rule set copies into every object it projects. A name short enough to
            /// be held inline, or one past the cap, is made as by `new`.
            pub(crate) fn interned(name: &str) -> Self {
                if name.len() <= INLINE_NAME {
                    return $name::new(name);
                }
                match intern(name) {
                    Some(s) => $name::from_static(s),
                    None => $name::new(name),
                }
            }

            /// The name as first spelled.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Whether this name equals `other`, ignoring case.
            pub fn is(&self, other: &str) -> bool {
                ci_eq(&self.0, other)
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                ci_eq(&self.0, &other.0)
            }
        }
        impl Eq for $name {}
        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                ci_eq(&self.0, other)
            }
        }
        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                ci_eq(&self.0, other)
            }
        }
        impl Hash for $name {
            fn hash<H: Hasher>(&self, state: &mut H) {
                ci_hash(&self.0, state)
            }
        }
        impl Ord for $name {
            fn cmp(&self, other: &Self) -> Ordering {
                ci_cmp(&self.0, &other.0)
            }
        }
        impl PartialOrd for $name {
            fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
                Some(self.cmp(other))
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name::new(s)
            }
        }
        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name::new(s)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

ci_name!(
    /// An attribute name: compared and hashed case-insensitively, printed as first spelled.
    ///
    /// ```
    /// use dirsync::model::AttrName;
    /// let a = AttrName::new("givenName");
    /// assert_eq!(a, AttrName::new("GIVENNAME"));
    /// assert_eq!(a.to_string(), "givenName");
    /// ```
    AttrName
);

ci_name!(
    /// An object type (`user`, `group`, `inetOrgPerson`, …), compared case-insensitively.
    ObjectType
);

/// Whether two strings are spelled byte for byte the same: a few word compares, without a
/// call into `memcmp` (attribute names are short).
#[inline(always)]
pub(crate) fn same_spelling(a: &str, b: &str) -> bool {
    let (x, y) = (a.as_bytes(), b.as_bytes());
    let n = x.len();
    if n != y.len() {
        return false;
    }
    let w4 = |s: &[u8], i: usize| {
        s.get(i..i + 4)
            .and_then(|c| <[u8; 4]>::try_from(c).ok())
            .map_or(0, u32::from_le_bytes)
    };
    match n {
        0 => true,
        1..=3 => x == y,
        4..=7 => w4(x, 0) == w4(y, 0) && w4(x, n - 4) == w4(y, n - 4),
        _ => {
            let mut i = 0;
            while i + 8 <= n {
                if word(x, i) != word(y, i) {
                    return false;
                }
                i += 8;
            }
            // The last 8 bytes (overlapping bytes already found equal).
            i == n || word(x, n - 8) == word(y, n - 8)
        }
    }
}

/// Compares two strings ignoring case, with the same folding as [`AttrName`].
pub fn eq_ignore_case(a: &str, b: &str) -> bool {
    ci_eq(a, b)
}

/// Orders two strings ignoring case, with the same folding as [`AttrName`].
pub fn cmp_ignore_case(a: &str, b: &str) -> Ordering {
    ci_cmp(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::DefaultHasher;
    use std::collections::HashSet;

    fn h(n: &AttrName) -> u64 {
        let mut s = DefaultHasher::new();
        n.hash(&mut s);
        s.finish()
    }

    #[test]
    fn case_insensitive_eq_hash_ord_keep_spelling() {
        let a = AttrName::new("sAMAccountName");
        let b = AttrName::new("samaccountname");
        assert_eq!(a, b);
        assert_eq!(h(&a), h(&b));
        assert_eq!(a.cmp(&b), Ordering::Equal);
        assert_eq!(a.to_string(), "sAMAccountName");
        let set: HashSet<_> = [a, b].into_iter().collect();
        assert_eq!(set.len(), 1);
        assert!(AttrName::new("cn") < AttrName::new("Mail"));
        assert_ne!(AttrName::new("cn"), AttrName::new("cn2"));
    }

    proptest::proptest! {
        #[test]
        fn same_spelling_is_byte_equality(a in "\\PC{0,40}", b in "\\PC{0,40}", cut in 0usize..40) {
            proptest::prop_assert_eq!(same_spelling(&a, &b), a == b);
            proptest::prop_assert!(same_spelling(&a, &a.clone()));
            // Strings that differ in one byte only, at any position.
            let mut c = a.clone().into_bytes();
            if let Some(byte) = c.get_mut(cut) {
                if byte.is_ascii_alphanumeric() {
                    *byte ^= 0x01;
                    let c = String::from_utf8(c).unwrap_or_default();
                    proptest::prop_assert_eq!(same_spelling(&a, &c), a == c);
                }
            }
        }
    }

    #[test]
    fn interned_names_are_shared_and_equal() {
        let long = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department";
        let a = AttrName::interned(long);
        let b = AttrName::interned(&long.to_uppercase());
        let c = AttrName::interned(long);
        assert_eq!(a, b);
        assert_eq!(a.as_str(), long);
        assert_eq!(b.as_str(), long.to_uppercase());
        // One copy per spelling.
        assert!(std::ptr::eq(a.as_str(), c.as_str()));
        assert!(std::ptr::eq(intern(long).unwrap(), intern(long).unwrap()));
        assert_eq!(AttrName::interned("cn").as_str(), "cn");
    }

    #[test]
    fn unicode_names_fold() {
        let a = AttrName::new("Größe");
        let b = AttrName::new("GRÖßE");
        assert_eq!(a, b);
        assert_eq!(h(&a), h(&b));
        // Mixed ASCII and non-ASCII spellings of the same name agree.
        assert_eq!(AttrName::new("KELVIN"), AttrName::new("kelvin"));
    }

    proptest::proptest! {
        #[test]
        fn word_compare_agrees_with_byte_compare(a in "[a-zA-Z0-9_@\\[\\]`{~^ -]{0,20}", b in "[a-zA-Z0-9_@\\[\\]`{~^ -]{0,20}", c in "\\PC{0,12}") {
            proptest::prop_assert_eq!(ci_cmp(&a, &b), ci_cmp_bytes(&a, &b));
            proptest::prop_assert_eq!(ci_cmp(&a, &c), ci_cmp_bytes(&a, &c));
            let ab = format!("{a}{b}");
            let ac = format!("{a}{c}");
            proptest::prop_assert_eq!(ci_cmp(&ab, &ac), ci_cmp_bytes(&ab, &ac));
            proptest::prop_assert_eq!(ci_cmp(&ab, &ab.to_uppercase()), ci_cmp_bytes(&ab, &ab.to_uppercase()));
            proptest::prop_assert_eq!(ci_eq(&ab, &ab.to_lowercase()), folded(&ab).eq(folded(&ab.to_lowercase())));
            proptest::prop_assert_eq!(ci_eq(&ab, &ac), folded(&ab).eq(folded(&ac)));
            proptest::prop_assert_eq!(ci_eq(&a, &b), folded(&a).eq(folded(&b)));
        }

        #[test]
        fn eq_implies_same_hash_and_equal_order(a in "\\PC{0,8}", flip in proptest::bool::ANY) {
            let b: String = if flip { a.to_uppercase() } else { a.to_lowercase() };
            let (x, y) = (AttrName::new(a.as_str()), AttrName::new(b.as_str()));
            if x == y {
                proptest::prop_assert_eq!(h(&x), h(&y));
                proptest::prop_assert_eq!(x.cmp(&y), Ordering::Equal);
            } else {
                proptest::prop_assert_ne!(x.cmp(&y), Ordering::Equal);
            }
        }
    }
}
