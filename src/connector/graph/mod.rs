//! Microsoft Entra ID through Microsoft Graph v1.0: [`GraphTarget`] provisions users, security
//! groups and memberships, authenticating with OAuth 2.0 client credentials ([`auth`]).
//! With the `testkit` feature, [`emulator`] is an in-process Graph that follows Microsoft's
//! documented behaviour (schema validation, uniqueness, throttling, delta queries, `$batch`).
//!
//! Only this folder (and the emulator's server) does network I/O for Graph; it never panics
//! on a server's answer and never prints a secret.
pub mod auth;
mod client;
pub mod csdl;
pub mod filter;
pub mod map;
mod target;

#[cfg(feature = "testkit")]
pub mod emulator;

pub use crate::connector::Secret;
pub use auth::{CertificateCredential, Credential};
pub use client::{GraphStats, StatsSnapshot, MAX_BATCH};
pub use target::{CredentialConfig, GraphChange, GraphConfig, GraphTarget, WATERMARK_KIND};
