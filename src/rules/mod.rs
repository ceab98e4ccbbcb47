//! The rule language: Entra-compatible attribute-flow expressions and scoping filters.
//!
//! Pure: no async, no I/O, no clock, no randomness of its own — `now` and a seed come in through
//! the evaluation context.

pub mod function;
pub mod regex;

pub use function::Function;
