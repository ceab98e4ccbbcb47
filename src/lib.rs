//! # dirsync
//!
//! An embeddable directory-synchronization library: it keeps the identities of one directory
//! (Active Directory, OpenLDAP, an LDIF export, …) provisioned into another (Microsoft Entra ID,
//! any SCIM 2.0 service, another LDAP directory). For every object it **creates** the target
//! object when the source object comes into scope, **keeps it updated** while it stays in scope,
//! and **deprovisions** it (delete, disable or unlink) when it leaves scope or disappears.
//!
//! The crate is built around a **pure** delta-calculation core:
//!
//! * [`model`] — entries, attribute names, values, DNs and anchors;
//! * [`delta`] — the planner: given a [`delta::Projection`], source objects, links and the
//!   target mirror it returns a [`delta::Plan`], and does no I/O;
//! * [`connector`] — the [`connector::Source`] and [`connector::Target`] traits and the in-memory
//!   connectors every behaviour can be tested with;
//! * [`rules`] — the Entra-compatible rule language (expressions and scoping filters);
//! * [`state`] — the [`state::StateStore`]: mirrors, links, dirty set, journal and watermarks,
//!   in memory or (feature `sqlite`) in one SQLite file;
//! * [`engine`] — the [`engine::Synchronizer`]: run profiles (import, sync, reconcile, staging,
//!   on-demand), crash-safe journaled export with retries, escrow and a circuit breaker, guards,
//!   progress events and run reports.
//!
//! Errors of every module convert into [`Error`].
//!
//! ## Cargo features
//!
//! * `parallel` (default) — plan large object sets on all cores with rayon; the plan is the
//!   same byte for byte with or without it.
//! * `sqlite` (default) — [`state::SqliteStore`], the embedded durable state store (SQLite is
//!   compiled in; no system library is needed).
//! * `ldif` (default) — [`connector::ldif`]: RFC 2849 reader and writer, an LDIF file as a
//!   source (full import; change records as delta) and as a target (written atomically).
//! * `testkit` — builders and fixtures for tests of this crate and of downstream crates.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod connector;
pub mod delta;
pub mod engine;
mod error;
pub mod model;
pub mod rules;
pub mod state;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use error::Error;

/// The guide `docs/writing-rules.md`, included here so that its Rust blocks run as doctests
/// (its TOML blocks are checked by `tests/writing_rules.rs`).
#[cfg(doctest)]
#[doc = include_str!("../docs/writing-rules.md")]
pub struct WritingRulesGuide;
