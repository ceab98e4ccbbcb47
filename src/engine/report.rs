//! What a run did: counts, durations, failures, guard decisions — and the progress events a
//! caller can draw a progress bar from.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::delta::GuardViolation;

/// The phase a progress event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Reading the source.
    Import,
    /// Computing the plan.
    Plan,
    /// Applying operations to the target.
    Export,
    /// Reading the target.
    Reconcile,
    /// Resolving operations a crash left unconfirmed.
    Recover,
}

/// A progress event: `done` of `total` units of `stage` (`total` is `None` when unknown, as for
/// an import stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The stage.
    pub stage: Stage,
    /// Units done.
    pub done: u64,
    /// Units in all, when known.
    pub total: Option<u64>,
}

/// A failed operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The source object.
    pub anchor: String,
    /// The operation kind (`create`, `update`, …).
    pub operation: String,
    /// The target object type.
    pub target_type: String,
    /// What went wrong.
    pub error: String,
    /// Whether it will be retried in a later run (escrow).
    pub escrowed: bool,
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// The run profile (`full-import`, `delta-sync`, `cycle`, …).
    pub profile: String,
    /// When it started.
    pub started: Option<DateTime<Utc>>,
    /// How long it took.
    pub duration: Duration,
    /// Objects read from the source (entries or changes).
    pub imported: u64,
    /// Objects read from the target (reconcile).
    pub reconciled: u64,
    /// Operations planned.
    pub planned: u64,
    /// Done operations by `(operation kind, target type)`.
    pub done: BTreeMap<String, u64>,
    /// Failed operations.
    pub failures: Vec<Failure>,
    /// Operations skipped because their object is in escrow until a later time.
    pub deferred: u64,
    /// Objects the planner could not place (conflicts, rule errors, unresolved references).
    pub issues: Vec<String>,
    /// Guard violations that held the export.
    pub guard_violations: Vec<GuardViolation>,
    /// The export was held by a guard (nothing was written).
    pub held: bool,
    /// The run stopped early, and why (circuit breaker).
    pub stopped: Option<String>,
    /// Operations resolved after a crash (found in the target, or not sent).
    pub recovered: u64,
    /// Retries made after retryable errors.
    pub retries: u64,
    /// Join values looked up in the target before creating objects the target mirror could
    /// not answer for (see [`JoinLookup`](super::JoinLookup)).
    #[serde(default)]
    pub looked_up: u64,
    /// Target objects those lookups found (then joined, not created, unless the planner
    /// reported a conflict).
    #[serde(default)]
    pub lookup_found: u64,
    /// Time per stage, in order.
    pub stages: Vec<(Stage, Duration)>,
}

impl RunReport {
    /// Number of done operations of `kind` (any type).
    pub fn count(&self, kind: &str) -> u64 {
        self.done
            .iter()
            .filter(|(k, _)| k.split_once(' ').map_or(k.as_str(), |(a, _)| a) == kind)
            .map(|(_, n)| n)
            .sum()
    }

    /// Total done operations.
    pub fn total_done(&self) -> u64 {
        self.done.values().sum()
    }

    /// Adds `n` done operations of `kind` to `target_type`.
    pub(crate) fn add_done(&mut self, kind: &str, target_type: &str, n: u64) {
        *self
            .done
            .entry(format!("{kind} {target_type}"))
            .or_default() += n;
    }

    /// Merges a later stage's report into this one.
    pub(crate) fn absorb(&mut self, other: RunReport) {
        self.imported += other.imported;
        self.reconciled += other.reconciled;
        self.planned += other.planned;
        for (k, v) in other.done {
            *self.done.entry(k).or_default() += v;
        }
        self.failures.extend(other.failures);
        self.deferred += other.deferred;
        self.issues.extend(other.issues);
        self.guard_violations.extend(other.guard_violations);
        self.held |= other.held;
        self.stopped = self.stopped.take().or(other.stopped);
        self.recovered += other.recovered;
        self.retries += other.retries;
        self.looked_up += other.looked_up;
        self.lookup_found += other.lookup_found;
        self.stages.extend(other.stages);
    }
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "run {} in {:.2?}", self.profile, self.duration)?;
        if self.imported > 0 {
            writeln!(f, "  imported {} objects", self.imported)?;
        }
        if self.reconciled > 0 {
            writeln!(f, "  read {} target objects", self.reconciled)?;
        }
        if self.looked_up > 0 {
            writeln!(
                f,
                "  looked up {} join values in the target before creating: {} found",
                self.looked_up, self.lookup_found
            )?;
        }
        writeln!(f, "  planned {} operations", self.planned)?;
        for (k, n) in &self.done {
            writeln!(f, "  done: {n} × {k}")?;
        }
        for fail in &self.failures {
            writeln!(
                f,
                "  FAILED {} {} {}: {}{}",
                fail.operation,
                fail.target_type,
                fail.anchor,
                fail.error,
                if fail.escrowed { " (will retry)" } else { "" }
            )?;
        }
        if self.deferred > 0 {
            writeln!(
                f,
                "  deferred {} operations (objects in escrow)",
                self.deferred
            )?;
        }
        for i in &self.issues {
            writeln!(f, "  issue: {i}")?;
        }
        for g in &self.guard_violations {
            writeln!(f, "  HELD: {g}")?;
        }
        if let Some(s) = &self.stopped {
            writeln!(f, "  STOPPED: {s}")?;
        }
        if self.recovered > 0 {
            writeln!(
                f,
                "  recovered {} operations left unconfirmed by a crash",
                self.recovered
            )?;
        }
        if self.retries > 0 {
            writeln!(f, "  retried {} times", self.retries)?;
        }
        Ok(())
    }
}
