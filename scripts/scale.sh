#!/usr/bin/env bash
# The scale benchmark (issue 15): builds the `scale` example in release mode and runs it once per
# size, printing one table per size (phases floor, initial, noop, full_sync, edit; seconds, ratio
# to the floor, operations/s, peak RSS, state size) and the state file's size per table.
#
#   scripts/scale.sh                        # 100000 then 1000000 users
#   scripts/scale.sh 10000 100000           # other sizes
#   scripts/scale.sh 100000 -- --json       # options after -- go to every run (see examples/scale.rs)
#
# Each run writes its export and state to a temporary directory ($TMPDIR, removed afterwards):
# at 1,000,000 users the export is about 0.8 GB and the state several GB. Put TMPDIR on the disk
# being measured, not on a tmpfs (fsync would cost nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=()
opts=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; opts=("$@"); break ;;
    *) sizes+=("$1"); shift ;;
  esac
done
[ "${#sizes[@]}" -gt 0 ] || sizes=(100000 1000000)
cargo build --release --example scale
label="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
for n in "${sizes[@]}"; do
  echo "== $n users, commit $label"
  target/release/examples/scale --users "$n" --label "$label" ${opts[@]+"${opts[@]}"}
done
