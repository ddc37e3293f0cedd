#!/bin/sh
# keepalived health check for dsbc: exit 0 when the local node serves, non-zero otherwise
# (curl's or wget's status: 22 for a 503, 7 or 28 when nothing answers).
#
#   check_dsbc.sh            GET /healthz: fails while the node drains, has no SIP worker
#                            alive, or does not answer within 1 s
#   check_dsbc.sh --strict   GET /healthz?strict=1: also fails while "degraded" (the
#                            store cannot be reached, or every node of a system is down);
#                            keepalived uses it with a negative weight, so that a node
#                            that still reaches Redis wins the VIP over one that does not
#
# The control API address: $DSBC_CONTROL (default http://127.0.0.1:8080, control.listen).
set -u
base="${DSBC_CONTROL:-http://127.0.0.1:8080}"
path="/healthz"
[ "${1:-}" = "--strict" ] && path="/healthz?strict=1"
if command -v curl >/dev/null 2>&1; then
    exec curl --silent --show-error --fail --max-time 1 --output /dev/null "$base$path"
fi
exec wget --quiet --timeout=1 --tries=1 --output-document=/dev/null "$base$path"
