//! The evaluation context of an expression (spec §1): the inputs that are not the object's
//! attributes — `now`, a seeded random source, the tenant's default domain, the object's app role
//! assignments and the uniqueness oracle for `SelectUniqueValue`.
//!
//! Nothing here reads a clock or an operating-system random source: the engine supplies `now`
//! and a seed, and the same seed with the same inputs gives the same results on every platform.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// One app role assignment of an object for the target application (spec §6, app-role functions).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppRoleValue {
    /// The app role id (a GUID in Entra).
    pub id: String,
    /// The role's value (the string `SingleAppRoleAssignment` returns).
    pub value: String,
    /// The role's display name.
    pub display_name: String,
}

/// A deterministic, platform-independent random source (ChaCha8), built from a 64-bit seed.
///
/// Used by `Guid()` and `RandomString()`; an evaluation that does not call them consumes nothing.
/// The generator is set up on first use, so building one per object costs nothing for rules that
/// draw no randomness; the stream is the same as if it had been set up eagerly.
#[derive(Debug, Clone)]
pub struct SeededRng {
    seed: u64,
    rng: Option<ChaCha8Rng>,
}

impl SeededRng {
    /// A generator whose whole output is determined by `seed`.
    pub fn from_seed(seed: u64) -> Self {
        SeededRng { seed, rng: None }
    }

    fn rng(&mut self) -> &mut ChaCha8Rng {
        let seed = self.seed;
        self.rng
            .get_or_insert_with(|| ChaCha8Rng::seed_from_u64(seed))
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        self.rng().next_u32()
    }

    /// Fills `dest` with random bytes.
    pub fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.rng().fill_bytes(dest)
    }

    /// A uniformly distributed integer in `0..n` (rejection sampling, no modulo bias).
    /// Returns 0 when `n` is 0 or 1.
    pub fn below(&mut self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        // Largest multiple of n32 that fits in u32 space; values at or above it are rejected.
        let zone = u32::MAX - (u32::MAX % n32);
        loop {
            let x = self.next_u32();
            if x < zone {
                return (x % n32) as usize;
            }
        }
    }
}

/// Everything an expression may read besides the object's attributes (spec §1).
pub struct EvalContext<'a> {
    /// The instant `Now()` returns; constant for one evaluation.
    pub now: DateTime<Utc>,
    /// The seeded random source for `Guid()` and `RandomString()`.
    pub rng: &'a mut SeededRng,
    /// The tenant's default verified domain, if configured (`DefaultDomain()`).
    pub default_domain: Option<&'a str>,
    /// The object's app role assignments for the target application, in source order.
    pub app_role_assignments: &'a [AppRoleValue],
    /// The uniqueness oracle of `SelectUniqueValue`: `true` when the candidate is **not** yet used
    /// in the target. The target connector supplies it; the default in-memory oracle
    /// ([`UsedValues::is_unique`]) compares case-insensitively (spec §6, §10 item 29).
    pub is_unique: &'a dyn Fn(&str) -> bool,
}

fn always_unique(_: &str) -> bool {
    true
}

impl<'a> EvalContext<'a> {
    /// A context at `now` drawing from `rng`, with no default domain, no app role assignments
    /// and an oracle that finds every value free.
    pub fn new(now: DateTime<Utc>, rng: &'a mut SeededRng) -> Self {
        EvalContext {
            now,
            rng,
            default_domain: None,
            app_role_assignments: &[],
            is_unique: &always_unique,
        }
    }
}

impl std::fmt::Debug for EvalContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvalContext")
            .field("now", &self.now)
            .field("default_domain", &self.default_domain)
            .field("app_role_assignments", &self.app_role_assignments)
            .finish_non_exhaustive()
    }
}

/// The default in-memory uniqueness oracle: a set of values already used in the target,
/// compared case-insensitively with simple lower-case folding.
#[derive(Debug, Clone, Default)]
pub struct UsedValues(HashSet<String>);

impl UsedValues {
    /// An empty set (every candidate is unique).
    pub fn new() -> Self {
        UsedValues::default()
    }

    /// Records `value` as used.
    pub fn insert(&mut self, value: &str) {
        self.0.insert(fold(value));
    }

    /// `true` when no used value equals `value` case-insensitively.
    pub fn is_unique(&self, value: &str) -> bool {
        !self.0.contains(&fold(value))
    }
}

fn fold(s: &str) -> String {
    s.chars()
        .map(crate::rules::functions::simple_lower)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_below_is_in_range() {
        let mut a = SeededRng::from_seed(7);
        let mut b = SeededRng::from_seed(7);
        let xs: Vec<u32> = (0..8).map(|_| a.next_u32()).collect();
        let ys: Vec<u32> = (0..8).map(|_| b.next_u32()).collect();
        assert_eq!(xs, ys);
        let mut c = SeededRng::from_seed(8);
        assert_ne!(xs, (0..8).map(|_| c.next_u32()).collect::<Vec<_>>());
        for n in [1usize, 2, 3, 10, 94] {
            for _ in 0..200 {
                assert!(a.below(n) < n.max(1));
            }
        }
        assert_eq!(a.below(0), 0);
    }

    #[test]
    fn lazy_setup_gives_the_eager_stream() {
        let mut lazy = SeededRng::from_seed(42);
        let mut eager = ChaCha8Rng::seed_from_u64(42);
        let mut buf = [0u8; 16];
        lazy.fill_bytes(&mut buf);
        let mut want = [0u8; 16];
        eager.fill_bytes(&mut want);
        assert_eq!(buf, want);
        assert_eq!(lazy.next_u32(), eager.next_u32());
        // A clone taken before first use starts the same stream.
        let fresh = SeededRng::from_seed(42);
        let mut copy = fresh.clone();
        let mut again = [0u8; 16];
        copy.fill_bytes(&mut again);
        assert_eq!(again, want);
    }

    #[test]
    fn used_values_compare_case_insensitively() {
        let mut used = UsedValues::new();
        used.insert("John.Doe@Contoso.com");
        assert!(!used.is_unique("john.doe@contoso.com"));
        assert!(used.is_unique("jane@contoso.com"));
        used.insert("İ");
        assert!(!used.is_unique("i"));
    }
}
