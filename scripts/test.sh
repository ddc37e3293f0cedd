#!/usr/bin/env bash
# Install everything the tests need (Debian packages and Python packages), then run them.
#   scripts/test.sh                 # the CI suite (slow load runs deselected)
#   scripts/test.sh -m slow         # only the long load runs
#   DSBC_SKIP_INSTALL=1 scripts/test.sh tests/test_sip_dispatch.py
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${DSBC_SKIP_INSTALL:-}" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends \
      sip-tester kamailio redis-server freeradius freeradius-utils freediameterd \
      nginx wrk chromium tshark iproute2 openssl procps gcc python3-dev >/dev/null
  fi
  python3 -m pip install -q -e '.[test]'
fi

args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(-m "not slow" tests)
fi
exec python3 -m pytest -q -p no:cacheprovider "${args[@]}"
