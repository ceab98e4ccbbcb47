#!/usr/bin/env bash
# The project's test command: installs what the tests need on a fresh Debian machine when it is
# missing, then runs the whole test suite (unit, integration, property and doc tests).
#
#   scripts/test.sh            # everything
#   scripts/test.sh <filter>   # only tests whose name matches <filter> (nextest filter)
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# The SCIM tests' server: scim2-server from PyPI in a virtualenv under .build/ (gitignored).
VENV=.build/scim-venv
if [ ! -x "$VENV/bin/scim2-server" ]; then
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -q && apt-get install -y -q python3-venv
      python3 -m venv "$VENV"
    else
      echo "python3 -m venv failed; install python3-venv (as root: apt-get install -y python3-venv)" >&2
      exit 1
    fi
  fi
  "$VENV/bin/pip" install -q scim2-server
fi
export DIRSYNC_SCIM2_SERVER="$PWD/$VENV/bin/scim2-server"

# Test runner: cargo-nextest when present, else cargo test.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --all-features --no-fail-fast "$@"
else
  cargo test --all-features --no-fail-fast -- "$@"
fi
# Doc tests (nextest does not run them).
cargo test --all-features --doc
