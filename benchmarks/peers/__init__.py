"""The C peers of the whole-system benchmarks, started on loopback and always stopped:
Kamailio (stateless dispatcher), nginx (reverse proxy and fixed-JSON back end),
FreeRADIUS (proxy mode and home server).  They reuse tests/peers (PeerProcess, free
ports, readiness probes)."""
