//! In-memory connectors.
