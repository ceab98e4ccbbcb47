#!/usr/bin/env bash
# The project's test command: installs what the tests need on a fresh Debian machine when it is
# missing, then runs the whole test suite (unit, integration, property and doc tests).
#
#   scripts/test.sh            # everything
#   scripts/test.sh <filter>   # only tests whose name matches <filter> (nextest filter)
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# Test runner: cargo-nextest when present, else cargo test.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --all-features --no-fail-fast "$@"
else
  cargo test --all-features --no-fail-fast -- "$@"
fi
# Doc tests (nextest does not run them).
cargo test --all-features --doc
