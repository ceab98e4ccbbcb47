#!/usr/bin/env bash
# The LDAP full-import benchmark (issue 5): dirsync's LdapSource::full_import next to ldapsearch,
# against one local slapd bulk-loaded with N generated entries, alternating rounds in one run.
# Installs slapd and ldap-utils when missing (Debian/Ubuntu, as root).
#
#   scripts/bench-ldap.sh [N] [ROUNDS] [--ldaps] [--runtime=current|multi] [--groups=G]
#   (default 100000 entries, 5 rounds, plain ldap://)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v slapd >/dev/null && [ ! -x /usr/sbin/slapd ] || ! command -v ldapsearch >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slapd ldap-utils
fi
cargo build --release --features ldap,testkit --example ldap_bench
exec target/release/examples/ldap_bench "$@"
