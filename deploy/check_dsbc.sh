#!/bin/sh
# keepalived health check for dsbc: exit 0 when the local node serves, non-zero otherwise
# (curl's or wget's status: 22 for a 503, 7 or 28 when nothing answers).
#
#   check_dsbc.sh [URL]            GET /healthz: fails while the node drains, has no SIP
#                                  worker alive, or does not answer within 1 s
#   check_dsbc.sh --strict [URL]   GET /healthz?strict=1: also fails while "degraded" (the
#                                  store cannot be reached, or every node of a system is
#                                  down); keepalived uses it with a negative weight, so that
#                                  a node that still reaches Redis wins the VIP over one
#                                  that does not
#
# URL: the control API (control.listen), e.g. http://127.0.0.1:8081; default $DSBC_CONTROL,
# else http://127.0.0.1:8080 (keepalived's scripts do not see your shell's environment: write
# the URL in its `script` line when control.listen is not the default).
set -u
path="/healthz"
if [ "${1:-}" = "--strict" ]; then
    path="/healthz?strict=1"
    shift
fi
base="${1:-${DSBC_CONTROL:-http://127.0.0.1:8080}}"
base="${base%/}"
if command -v curl >/dev/null 2>&1; then
    exec curl --silent --show-error --fail --max-time 1 --output /dev/null "$base$path"
fi
exec wget --quiet --timeout=1 --tries=1 --output-document=/dev/null "$base$path"
