//! In-memory connectors: [`MemorySource`] and [`MemoryTarget`], directories held in memory that
//! behave like servers — change logs and watermarks, unique ids and values, strict updates — with
//! fault injection, so that every engine behaviour can be tested without a server, by this crate
//! and by downstream crates.
//!
//! They do no I/O and never hold a lock across an `await`; both are cloneable handles onto shared
//! content, so a test keeps one handle while the engine owns another.

mod source;
mod target;

pub use source::{MemorySource, WATERMARK_KIND};
pub use target::MemoryTarget;
