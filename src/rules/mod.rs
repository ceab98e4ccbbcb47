//! The rule language: Entra-compatible attribute-flow expressions and scoping filters.
//!
//! Pure: no async, no I/O, no clock, no randomness of its own — `now` and a seed come in through
//! the evaluation context.

pub mod context;
pub mod datetime;
pub mod diagnostic;
pub mod eval;
pub mod expr;
pub mod function;
pub mod functions;
pub mod regex;
pub mod scope;
pub mod value;

pub use function::Function;
