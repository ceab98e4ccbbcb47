//! Helpers shared by integration tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Builds the `sync` example and returns its path, as cargo reports it. Every test builds it
/// with the same features as the test build (`--all-features`): one artifact, built once, never
/// replaced under a running test.
pub fn build_sync() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "--all-features",
            "--example",
            "sync",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .expect("cargo build --example sync");
    assert!(out.status.success(), "building the sync example failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "sync")
        .and_then(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo did not report the sync example's executable")
}
