#!/usr/bin/env bash
# The project's test command: installs what the tests need on a fresh Debian machine when it is
# missing, then runs the whole test suite (unit, integration, property and doc tests).
#
#   scripts/test.sh            # everything
#   scripts/test.sh <filter>   # only tests whose name matches <filter> (nextest filter)
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# The LDAP tests' servers: OpenLDAP slapd, Samba as an AD domain controller (run by the tests in
# network namespaces of their own: `unshare`, `ip`), the OpenLDAP and ldb command line tools, and
# openssl for the throwaway test CA. Installed from Debian when missing; no service is started.
need=()
for cmd in slapd:slapd ldapsearch:ldap-utils samba:samba samba-tool:samba ldbadd:ldb-tools \
           openssl:openssl ip:iproute2 unshare:util-linux; do
  command -v "${cmd%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${cmd%%:*}" ] || need+=("${cmd#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # policy-rc.d 101: the packages' own services (slapd on 389, samba) are not started.
    made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
      made_policy=1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
      $(printf '%s\n' "${need[@]}" | sort -u)
    [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
  else
    echo "missing: ${need[*]} (as root: apt-get install -y ${need[*]})" >&2
    exit 1
  fi
fi
# Missing server binaries fail the LDAP tests instead of skipping them.
export DIRSYNC_REQUIRE_SERVERS=1

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
