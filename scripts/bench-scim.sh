#!/usr/bin/env bash
# The SCIM export benchmark (issue 6): dirsync's ScimTarget against a plain reqwest loop, both
# sending to a local scim2-server with the same concurrency. Installs scim2-server when missing.
#
#   scripts/bench-scim.sh [USERS] [CONCURRENCY]      (default 10000 4: scim2-server's accept backlog is 5; more
# concurrent connections make it drop SYNs, and both sides then wait on TCP retransmits)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.build/scim-venv
if [ ! -x "$VENV/bin/scim2-server" ]; then
  python3 -m venv "$VENV" || { apt-get install -y -q python3-venv && python3 -m venv "$VENV"; }
  "$VENV/bin/pip" install -q scim2-server
fi
export DIRSYNC_SCIM2_SERVER="$PWD/$VENV/bin/scim2-server"
cargo run --release --features scim --example scim_bench -- "$@"
