//! The pure delta-calculation core.
//!
//! [`plan`] takes a [`Projection`] (what is in scope, how entries join, what their target objects
//! should look like, how they are deprovisioned), the source mirror, the link table and the
//! target mirror, and returns a [`Plan`]: creates (referenced objects first, each carrying the
//! references it can), then updates, then reference updates, then deprovisions, each with its
//! [`Reason`], sorted so the same input gives the same plan byte for byte. [`SnapshotDiff`] turns a full import into changes. [`DeletionGuard`] holds plans that
//! delete too much.
//!
//! Nothing here does I/O, reads a clock, draws randomness or uses async; `tests/tidy.rs` keeps it
//! so.
//!
//! ```
//! use dirsync::delta::{self, Deprovision, DeprovisionCause, Desired, Flow, Link, Links,
//!     PlanInput, Projected, Projection, ProjectionContext, SourceMirror, TargetMirror};
//! use dirsync::model::Entry;
//!
//! /// Every user is in scope and flows its `cn` to the target's `displayName`.
//! struct Users;
//! impl Projection for Users {
//!     fn project(&self, e: &Entry, _: &ProjectionContext<'_>) -> Projected {
//!         let cn = e.get("cn").cloned().unwrap_or_default();
//!         Projected::InScope(Desired::new("User").flow(Flow::new("displayName", cn)))
//!     }
//!     /// Users who leave scope are disabled (and re-enabled when they return); deleted ones
//!     /// are deleted.
//!     fn deprovision(&self, _: &Link, _: Option<&Entry>, cause: DeprovisionCause) -> Deprovision {
//!         match cause {
//!             DeprovisionCause::LeftScope => Deprovision::disable([("active", false)]),
//!             _ => Deprovision::Delete,
//!         }
//!     }
//! }
//!
//! let mut mirror = SourceMirror::new();
//! mirror.insert(Entry::new("a1", "user").with("cn", "Ada"));
//! let (links, target) = (Links::new(), TargetMirror::new());
//! let plan = delta::plan(&PlanInput::new(&Users, &mirror, &links, &target));
//! assert_eq!(plan.count("create"), 1);
//! println!("{plan}");
//! ```

mod containers;
mod guard;
mod order;
mod plan;
mod planner;
mod projection;
mod snapshot;
mod state;

pub use containers::{
    ContainerBinding, ContainerBindings, ContainerDecision, ContainerLookup, ContainerRef,
    ContainerScope,
};
pub use guard::DeletionGuard;
pub use order::CreateReferences;
pub use plan::{
    GuardViolation, Issue, Operation, OperationKind, PendingReference, Phase, Plan, PlanStats,
    Reason, TargetRef,
};
pub use planner::{decide_page, plan, plan_decided, Decisions, PlanInput, PlanScope};
pub(crate) use planner::{plan_decided_or_incomplete, plan_relinking, survey};
pub use projection::{
    enabled_values, Apply, Deprovision, DeprovisionCause, Desired, Flow, JoinGroup, Projected,
    Projection, ProjectionContext, ProjectionError, WhenEmpty,
};
pub use snapshot::{attribute_changes, SnapshotDiff};
#[cfg(feature = "sqlite")]
pub(crate) use state::remove_references_to;
pub(crate) use state::{resolve_change_values, resolve_references};
pub use state::{Link, Links, SourceMirror, TargetMirror};
