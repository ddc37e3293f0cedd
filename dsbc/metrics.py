"""Metrics: the workers' status snapshots, summed, in the Prometheus text format.

Every worker writes ``worker-N-PID.json`` into the run directory once a second (dsbc/runner.py):
``{"worker", "pid", "ts", "store_healthy", "store": {...}, "services": {"sip": ..., ...}}``.
When a worker is gone (a reload replaced it, it was killed), the master folds the counters
of its last snapshot into ``retired.json`` (`retire`), so the node's counters never go
back: Prometheus takes any decrease for a reset to zero, and one of several workers
restarting would show as a burst of everything the others had counted.
`read_snapshots` reads the fresh ones, `summarize` adds them up into one plain dict (what
``GET /v1/status`` and ``dsbc status`` show) and `render` writes the Prometheus text
(``GET /metrics``).  The services' counters keep their own names; here they become
well-named metric families, e.g. the SIP core's ``requests_in:INVITE`` becomes
``dsbc_sip_requests_total{method="INVITE"}`` and ``forwarded:target`` becomes
``dsbc_sip_forwarded_total{system="target"}``.

Nothing here does I/O but `read_snapshots` and `read_retired`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SNAPSHOT_MAX_AGE = 5.0  # seconds; older snapshots are of workers that are gone
RETIRED = "retired.json"  # the counters of the workers that are gone, in the run directory
_RETIRED_PIDS = 256  # workers remembered as folded (a snapshot read just before its fold)


def worker_key(snap: dict[str, Any]) -> str:
    """Which worker process a snapshot is of: its pid and start (a pid comes back)."""
    return f"{snap.get('pid')}@{snap.get('started', '')}"

# SIP core counter "name:label" -> (metric, label name); plain names map to dsbc_sip_<name>_total
_SIP_LABELLED = {
    "requests_in": ("dsbc_sip_requests_total", "method"),
    "responses_in": ("dsbc_sip_responses_total", "class"),
    "forwarded": ("dsbc_sip_forwarded_total", "system"),
    "rejected": ("dsbc_sip_rejected_total", "reason"),
    "bad_requests": ("dsbc_sip_bad_requests_total", "code"),
}
_HELP = {
    "dsbc_sip_requests_total": "SIP requests received, by method",
    "dsbc_sip_responses_total": "SIP responses received, by class",
    "dsbc_sip_forwarded_total": "SIP requests relayed, by system (direct: by Route, no lookup)",
    "dsbc_sip_routed_total": "SIP requests relayed, by system and method",
    "dsbc_sip_rejected_total": "SIP requests answered by dsbc with an error, by status or reason",
    "dsbc_sip_bad_requests_total": "Malformed SIP requests answered, by status",
    "dsbc_sip_held_total": "Out-of-dialog SIP requests held because their customer was locked",
    "dsbc_sip_held_released_total": "Held SIP requests relayed once their customer's flip committed",
    "dsbc_sip_locked_rejected_total": "Held SIP requests answered 503 after store.lock_hold",
    "dsbc_sip_held": "SIP requests held now",
    "dsbc_sip_connections": "Open SIP TCP/TLS connections",
    "dsbc_sip_lookups_total": "Owner lookups for out-of-dialog SIP requests",
    "dsbc_sip_lookup_misses_total": "Owner lookups that found no customer (store.unknown applied)",
    "dsbc_backend_up": "Back-end node health as dsbc sees it (1 up, 0 down)",
    "dsbc_backend_rtt_seconds": "Health-check round trip of a back-end node",
    "dsbc_backend_ping_failures_total": "Failed health checks of a back-end node",
    "dsbc_store_healthy": "1 when every worker reaches the store, 0 while dispatching from memory",
    "dsbc_store_change_seq": "Change sequence: applied by the workers (lowest) and seen in the store",
    "dsbc_store_change_gap": "Changes committed in the store and not applied yet (largest of the workers)",
    "dsbc_store_last_change_age_seconds": "Seconds since a worker last applied a change",
    "dsbc_store_contact_age_seconds": "Seconds since the store last answered a worker's probe",
    "dsbc_workers": "Worker processes with a fresh status snapshot",
    "dsbc_customers": "Customers by system and state",
    "dsbc_identities": "Identities in the store",
    "dsbc_registrations": "Live registrations dsbc relayed",
    "dsbc_registrations_by_system": "Live registrations dsbc relayed, by the system that granted them",
    "dsbc_customers_prepared": "Customers whose registration expiry is capped (dsbc migrate --prepare)",
    "dsbc_migrations_total": "Migration batches made through this node's control API, by target system",
    "dsbc_migrated_customers_total": "Customers moved through this node's control API, by target system",
    "dsbc_rollbacks_total": "Rollbacks made through this node's control API",
    "dsbc_last_batch_timestamp_seconds": "When the most recent batch moved its first customer",
    "dsbc_up": "1 while the node serves (0 while draining)",
}


def read_snapshots(run_dir: Path | str | None, max_age: float = SNAPSHOT_MAX_AGE,
                   now: float | None = None) -> list[dict[str, Any]]:
    """The fresh ``worker-*.json`` snapshots of the run directory, by worker index (the
    caller skips those `read_retired`, read after them, lists as folded)."""
    if not run_dir:
        return []
    now = time.time() if now is None else now
    out = []
    for p in sorted(Path(run_dir).glob("worker-*.json")):
        try:
            snap = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(snap, dict) and now - float(snap.get("ts", 0)) <= max_age:
            out.append(snap)
    out.sort(key=lambda s: (s.get("worker") if isinstance(s.get("worker"), int) else -1, float(s.get("ts", 0))))
    return out


def read_retired(run_dir: Path | str | None) -> dict[str, Any]:
    """``retired.json``: {"folded": [`worker_key`...], "families": {name: [help, {labels json:
    value}]}}.
    Read it after the snapshots: the master writes it before it deletes the snapshot it
    folded, so a snapshot read is either still there or already skipped by its pid."""
    if not run_dir:
        return {}
    try:
        data = json.loads((Path(run_dir) / RETIRED).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def retire(retired: dict[str, Any], snap: dict[str, Any]) -> dict[str, Any]:
    """``retired`` with the counters of a gone worker's last snapshot added in."""
    control = (snap.get("services") or {}).get("control") or {}
    extra = {"migrations": control.get("migrations") or {}, "moved": control.get("moved") or {},
             "rollbacks": (control.get("requests") or {}).get("rollbacks_done", 0)}
    families: dict[str, Any] = dict(retired.get("families") or {})
    for name, (kind, help_text, samples) in _exposition(summarize([snap]), extra).families.items():
        if kind != "counter":
            continue
        fam = families.setdefault(name, [help_text, {}])
        for labels, value in samples.items():
            key = json.dumps(labels)
            fam[1][key] = fam[1].get(key, 0.0) + value
    status: dict[str, Any] = json.loads(json.dumps(retired.get("status") or {}))  # a deep copy
    for name, part in _status_counts(summarize([snap])["services"]).items():
        _add(status.setdefault(name, {}), part)
    key = worker_key(snap)
    folded = [k for k in (retired.get("folded") or []) if k != key] + [key]
    return {"folded": folded[-_RETIRED_PIDS:], "families": families, "status": status}


#: the running totals `dsbc status` shows, by service (the rest are gauges or states)
_STATUS_COUNTERS = {"sip": ("counters", "lookups", "misses"),
                    "radius": ("requests", "answers", "duplicates", "held", "drops"),
                    "diameter": ("requests", "answers", "held", "drops", "local_answers"),
                    "api": ("metrics",)}


def _status_counts(services: dict[str, Any]) -> dict[str, Any]:
    return {name: {k: services[name][k] for k in keys if k in services[name]}
            for name, keys in _STATUS_COUNTERS.items() if isinstance(services.get(name), dict)}


def with_retired(summary: dict[str, Any], retired: dict[str, Any]) -> dict[str, Any]:
    """``summary`` (of the live workers) with the running totals of the gone ones added, as
    /metrics adds them: `dsbc status` counts do not go back at a reload either."""
    services = summary.get("services") or {}
    for name, part in (retired.get("status") or {}).items():
        if isinstance(services.get(name), dict) and isinstance(part, dict):
            _add(services[name], part)
    return summary


# --- summing -------------------------------------------------------------------------------


def _add(total: dict[str, Any], part: dict[str, Any]) -> None:
    """Numbers add up, dicts merge recursively; other values keep the first one seen."""
    for k, v in part.items():
        if isinstance(v, bool):
            total.setdefault(k, v)
        elif isinstance(v, (int, float)):
            cur = total.get(k, 0)
            total[k] = (cur if isinstance(cur, (int, float)) and not isinstance(cur, bool) else 0) + v
        elif isinstance(v, dict):
            sub = total.setdefault(k, {})
            if isinstance(sub, dict):
                _add(sub, v)
        else:
            total.setdefault(k, v)


def _nodes(snaps: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """SIP back-end nodes across workers: up only if every worker sees it up; rtt averaged."""
    by_node: dict[tuple[str, str], dict[str, Any]] = {}
    for snap in snaps:
        for n in snap.get("services", {}).get("sip", {}).get("nodes", []) or []:
            key = (str(n.get("system", "")), str(n.get("node", "")))
            cur = by_node.setdefault(key, {"system": key[0], "node": key[1], "up": True,
                                           "rtt_ms": 0.0, "failures": 0, "_n": 0})
            cur["up"] = cur["up"] and bool(n.get("up"))
            cur["rtt_ms"] += float(n.get("rtt_ms") or 0.0)
            cur["failures"] += int(n.get("failures") or 0)
            cur["_n"] += 1
    out = []
    for cur in by_node.values():
        cur["rtt_ms"] = round(cur["rtt_ms"] / max(1, cur.pop("_n")), 2)
        out.append(cur)
    return out


def _add_rate_limit(total: dict[str, Any], part: dict[str, Any]) -> None:
    """The workers' rate limiters as one: the sources blocked now by any worker (a source
    port always reaches the same worker, a source spread over ports several)."""
    for k in ("limit", "window"):
        total.setdefault(k, part.get(k))
    for k in ("sources_tracked", "blocks_total"):
        total[k] = int(total.get(k) or 0) + int(part.get(k) or 0)
    blocked = sorted({*(total.get("blocked") or ()), *(str(b) for b in part.get("blocked") or ())})
    total["blocked"] = blocked[:20]
    total["sources_blocked"] = max(len(blocked), int(total.get("sources_blocked") or 0),
                                   int(part.get("sources_blocked") or 0))


def summarize(snaps: list[dict[str, Any]]) -> dict[str, Any]:
    """One node's view: workers, per-service sums, back ends, store health."""
    services: dict[str, dict[str, Any]] = {}
    for snap in snaps:
        for name, st in (snap.get("services") or {}).items():
            if isinstance(st, dict) and name != "sip":
                _add(services.setdefault(name, {}), st)
    sip: dict[str, Any] = {"counters": {}, "held": 0, "connections": 0, "lookups": 0, "misses": 0}
    sip_indexes: set[Any] = set()
    for i, snap in enumerate(snaps):
        st = (snap.get("services") or {}).get("sip")
        if not isinstance(st, dict) or "error" in st:
            continue
        sip_indexes.add(snap.get("worker", i))
        _add(sip["counters"], st.get("counters") or {})
        for k in ("held", "connections", "lookups", "misses"):
            sip[k] += int(st.get(k) or 0)
        if isinstance(st.get("rate_limit"), dict):
            _add_rate_limit(sip.setdefault("rate_limit", {}), st["rate_limit"])
    sip["nodes"] = _nodes(snaps)
    if sip_indexes:
        services["sip"] = sip
    stores = [s.get("store") or {} for s in snaps]
    gaps = [int(s.get("seq_gap") or 0) for s in stores]
    applied = [int(s["seq_applied"]) for s in stores if "seq_applied" in s]
    store: dict[str, Any] = {
        "healthy": all(bool(s.get("store_healthy", True)) for s in snaps) if snaps else None,
        "reasons": sorted({str(s.get("reason")) for s in stores if s.get("reason")}),
        "kind": next((s.get("kind") for s in stores if s.get("kind")), "sqlite"),
        "seq_gap": max(gaps, default=0),
    }
    if applied:
        store["seq_applied"] = min(applied)
        store["seq_remote"] = max(int(s.get("seq_remote") or 0) for s in stores)
    ages = [float(s["since_change"]) for s in stores if s.get("since_change") is not None]
    if ages:
        store["last_change_age"] = max(ages)
    probes = [float(s["since_probe"]) for s in stores if s.get("since_probe") is not None]
    if probes:
        store["contact_age"] = max(probes)
    return {
        # by index: on a reload the replaced worker and its successor both report a while
        "workers": len({s.get("worker", i) for i, s in enumerate(snaps)}),
        "sip_workers": len(sip_indexes),
        "pids": [s.get("pid") for s in snaps],
        "services": services,
        "store": store,
    }


# --- Prometheus text -----------------------------------------------------------------------

_NAME_JUNK = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(text: str) -> str:
    name = _NAME_JUNK.sub("_", text).strip("_").lower()
    return name if name and not name[0].isdigit() else f"_{name}"


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Exposition:
    """Families of samples, written in the text format (0.0.4)."""

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, dict[tuple[tuple[str, str], ...], float]]] = {}

    def add(self, name: str, value: float, kind: str = "counter", help_text: str = "",
            **labels: object) -> None:
        fam = self.families.get(name)
        if fam is None:
            fam = self.families[name] = (kind, _HELP.get(name) or help_text or name, {})
        key = tuple((k, str(v)) for k, v in sorted(labels.items()))
        fam[2][key] = fam[2].get(key, 0.0) + float(value)

    def render(self) -> str:
        lines: list[str] = []
        for name, (kind, help_text, samples) in self.families.items():
            lines.append(f"# HELP {name} {_escape(help_text)}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples.items():
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                num = repr(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)
                lines.append(f"{name}{{{text}}} {num}" if text else f"{name} {num}")
        return "\n".join(lines) + "\n"


# SIP counters exported from the start, at 0: those docs/OPERATIONS.md and docs/SECURITY.md
# tell operators to watch and alert on.  The core counts a key from its first event only,
# and a series that appears at 1 loses that event to rate() and increase().
_SIP_ZEROS = ("held", "held_released", "locked_rejected", "forwarded:source", "forwarded:target",
              "rejected:no_node", "rejected:unknown", "rejected:503",
              *(f"responses_in:{n}xx" for n in range(1, 7)),
              "rate_limited", "rate_limited_answered", "scanners_dropped", "tcp_refused",
              "tcp_stalled_closed", "tcp_idle_closed", "tls_handshake_failed", "too_large",
              "responses_forged", "registrations_capped")


def _sip(exp: Exposition, sip: dict[str, Any]) -> None:
    counters = dict.fromkeys(_SIP_ZEROS, 0) | (sip.get("counters") or {})
    for key, value in sorted(counters.items()):
        if not isinstance(value, (int, float)):
            continue
        name, sep, label = key.partition(":")
        if sep and name == "routed":  # "routed:<system>/<method>"
            system, _, method = label.partition("/")
            exp.add("dsbc_sip_routed_total", value, system=system, method=method)
        elif sep and name in _SIP_LABELLED:
            metric, label_name = _SIP_LABELLED[name]
            exp.add(metric, value, **{label_name: label})
        elif sep:
            exp.add(f"dsbc_sip_{metric_name(name)}_total", value, help_text=f"SIP {name}", key=label)
        else:
            exp.add(f"dsbc_sip_{metric_name(name)}_total", value, help_text=f"SIP {name.replace('_', ' ')}")
    exp.add("dsbc_sip_held", sip.get("held", 0), "gauge")
    exp.add("dsbc_sip_connections", sip.get("connections", 0), "gauge")
    exp.add("dsbc_sip_lookups_total", sip.get("lookups", 0))
    exp.add("dsbc_sip_lookup_misses_total", sip.get("misses", 0))
    for n in sip.get("nodes", []):
        labels = {"protocol": "sip", "system": n["system"], "node": n["node"]}
        exp.add("dsbc_backend_up", 1 if n["up"] else 0, "gauge", **labels)
        exp.add("dsbc_backend_rtt_seconds", n["rtt_ms"] / 1000.0, "gauge", **labels)
        exp.add("dsbc_backend_ping_failures_total", n["failures"], **labels)


def _plain(exp: Exposition, proto: str, st: dict[str, Any], keys: Iterable[str]) -> None:
    for key in keys:
        value = st.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            exp.add(f"dsbc_{proto}_{metric_name(key)}_total", value,
                    help_text=f"{proto.upper()} {key.replace('_', ' ')}")


def _radius(exp: Exposition, st: dict[str, Any]) -> None:
    _plain(exp, "radius", st, ("requests", "answers", "duplicates", "held", "send_errors"))
    for reason, n in (st.get("drops") or {}).items():
        exp.add("dsbc_radius_dropped_total", n, help_text="RADIUS packets dropped, by reason", reason=reason)
    exp.add("dsbc_radius_accounting_sessions", st.get("accounting_sessions", 0), "gauge",
            help_text="RADIUS accounting sessions stuck to a system")
    for system, s in (st.get("systems") or {}).items():
        exp.add("dsbc_radius_forwarded_total", s.get("requests", 0),
                help_text="RADIUS requests relayed, by system", system=system)
        exp.add("dsbc_radius_backend_timeouts_total", s.get("timeouts", 0),
                help_text="RADIUS requests a system did not answer", system=system)
        for node, state in (s.get("servers") or {}).items():
            exp.add("dsbc_backend_up", 0 if state == "dead" else 1, "gauge",
                    protocol="radius", system=system, node=node)


def _diameter(exp: Exposition, st: dict[str, Any]) -> None:
    _plain(exp, "diameter", st, ("requests", "answers", "held", "bad_messages"))
    for reason, n in (st.get("drops") or {}).items():
        exp.add("dsbc_diameter_dropped_total", n, help_text="Diameter messages dropped, by reason", reason=reason)
    for code, n in (st.get("local_answers") or {}).items():
        exp.add("dsbc_diameter_local_answers_total", n,
                help_text="Diameter answers made by dsbc, by result code", code=code)
    exp.add("dsbc_diameter_sessions", st.get("sessions", 0), "gauge", help_text="Diameter sessions stuck to a system")
    for system, s in (st.get("systems") or {}).items():
        exp.add("dsbc_diameter_forwarded_total", s.get("requests", 0),
                help_text="Diameter requests relayed, by system", system=system)
        exp.add("dsbc_backend_up", 1 if s.get("peer") == "open" else 0, "gauge",
                protocol="diameter", system=system, node=s.get("identity") or system)


def _api(exp: Exposition, st: dict[str, Any]) -> None:
    for key, value in sorted((st.get("metrics") or {}).items()):
        if not isinstance(value, (int, float)):
            continue
        if key.startswith("to_"):
            exp.add("dsbc_api_forwarded_total", value, help_text="API requests relayed, by system",
                    system=key[3:])
        elif key == "backend_errors":  # not in dsbc_api_backend_errors_total{system}: one family
            # with a total beside its per-system series is counted twice by sum() and rate()
            exp.add("dsbc_api_backend_unavailable_total", value,
                    help_text="API requests answered with a fault: their system could not be reached")
        else:
            exp.add(f"dsbc_api_{metric_name(key)}_total", value, help_text=f"API {key.replace('_', ' ')}")
    for system, b in (st.get("backends") or {}).items():
        exp.add("dsbc_backend_up", 1 if b.get("healthy") else 0, "gauge", protocol="api",
                system=system, node=system)
        exp.add("dsbc_api_backend_errors_total", b.get("errors", 0),
                help_text="API requests a system failed", system=system)


def render(summary: dict[str, Any], extra: dict[str, Any] | None = None,
           retired: dict[str, Any] | None = None) -> str:
    """The Prometheus text of a `summarize` result (plus the control service's `extra`:
    up, customers, migrations; and the counters of the workers that are gone)."""
    exp = _exposition(summary, extra)
    for name, (help_text, samples) in ((retired or {}).get("families") or {}).items():
        for key, value in samples.items():
            exp.add(name, value, "counter", help_text, **dict(json.loads(key)))
    return exp.render()


def _exposition(summary: dict[str, Any], extra: dict[str, Any] | None = None) -> Exposition:
    exp = Exposition()
    extra = extra or {}
    exp.add("dsbc_up", 1 if extra.get("up", True) else 0, "gauge")
    exp.add("dsbc_workers", summary.get("workers", 0), "gauge")
    services = summary.get("services", {})
    if "sip" in services:
        _sip(exp, services["sip"])
    if "radius" in services:
        _radius(exp, services["radius"])
    if "diameter" in services:
        _diameter(exp, services["diameter"])
    if "api" in services:
        _api(exp, services["api"])
    store = summary.get("store", {})
    if store.get("healthy") is not None:
        exp.add("dsbc_store_healthy", 1 if store["healthy"] else 0, "gauge")
    if "seq_applied" in store:
        exp.add("dsbc_store_change_seq", store["seq_applied"], "gauge", which="applied")
        exp.add("dsbc_store_change_seq", store["seq_remote"], "gauge", which="store")
    exp.add("dsbc_store_change_gap", store.get("seq_gap", 0), "gauge")
    if "last_change_age" in store:
        exp.add("dsbc_store_last_change_age_seconds", store["last_change_age"], "gauge")
    if "contact_age" in store:
        exp.add("dsbc_store_contact_age_seconds", store["contact_age"], "gauge")
    counts = extra.get("counts") or {}
    for key, value in counts.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "customers":
            exp.add("dsbc_customers", value, "gauge", system=parts[1], state=parts[2])
    for key in ("identities", "registrations"):
        if key in counts:
            exp.add(f"dsbc_{key}", counts[key], "gauge")
    for system in ("source", "target"):  # a hand-over's progress (SPEC 6)
        if f"registrations.{system}" in counts:
            exp.add("dsbc_registrations_by_system", counts[f"registrations.{system}"], "gauge", system=system)
    if "prepared" in counts:
        exp.add("dsbc_customers_prepared", counts["prepared"], "gauge")
    for key, metric in (("migrations", "dsbc_migrations_total"), ("moved", "dsbc_migrated_customers_total")):
        # from 0, for both systems (as _SIP_ZEROS)
        for to, n in sorted((dict.fromkeys(("source", "target"), 0) | (extra.get(key) or {})).items()):
            exp.add(metric, n, to=to)
    if "rollbacks" in extra:
        exp.add("dsbc_rollbacks_total", extra["rollbacks"])
    if extra.get("last_batch_ts"):
        exp.add("dsbc_last_batch_timestamp_seconds", extra["last_batch_ts"], "gauge")
    return exp


# --- the same, readable (dsbc status) ----------------------------------------------------------


def _pairs(counts: dict[str, Any], prefix: str) -> str:
    items = sorted(((k[len(prefix):], v) for k, v in counts.items() if k.startswith(prefix)),
                   key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k} {v}" for k, v in items) or "none"


def backend_rows(summary: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(protocol, system, node, state, rtt ms, failures) of every back end the node sees."""
    rows: list[tuple[str, str, str, str, str, str]] = []
    services = summary.get("services", {})
    for n in services.get("sip", {}).get("nodes", []):
        rows.append(("sip", n["system"], n["node"], "up" if n["up"] else "DOWN",
                     f"{n['rtt_ms']:.2f}", str(n["failures"])))
    for system, s in (services.get("radius", {}).get("systems") or {}).items():
        for node, state in (s.get("servers") or {}).items():
            timeouts = (s.get("server_timeouts") or {}).get(node, 0)  # this server's, not the system's
            rows.append(("radius", system, node, "DOWN" if state == "dead" else state, "", str(timeouts)))
    for system, s in (services.get("diameter", {}).get("systems") or {}).items():
        rows.append(("diameter", system, str(s.get("identity") or "-"),
                     "up" if s.get("peer") == "open" else "DOWN", "", ""))
    for system, b in (services.get("api", {}).get("backends") or {}).items():
        state = "DOWN" if not b.get("healthy") else "up" if b.get("answered", True) else "untried"
        rows.append(("api", system, ", ".join(b.get("urls") or ()) or system, state, "", str(b.get("errors", 0))))
    return rows


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], indent: str = "    ") -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
            for r in [header, *rows]]


def status_lines(status: dict[str, Any]) -> list[str]:
    """``GET /v1/status`` as the lines `dsbc status` prints for the running node."""
    summary = status.get("node", {})
    store = status.get("store", {})
    draining = ", DRAINING" if status.get("draining") else ""
    out = [
        f"  workers: {summary.get('workers', 0)} ({summary.get('sip_workers', 0)} SIP), "
        + f"up {status.get('uptime', 0):.0f} s{draining}"
    ]
    s = summary.get("store", {})
    health = "healthy" if store.get("healthy", s.get("healthy")) else "UNHEALTHY (dispatching from memory)"
    line = f"  store: {health}"
    if "seq_applied" in s:
        line += f"; change {s['seq_applied']} applied, gap {s.get('seq_gap', 0)}"
    if s.get("contact_age") is not None:
        line += f", last contact {s['contact_age']:.1f} s ago"
    out.append(line)
    for reason in s.get("reasons", []) or ([store["reason"]] if store.get("reason") else []):
        out.append(f"    {reason}")
    rows = backend_rows(summary)
    if rows:
        out.append("  back ends:")
        out += table(("PROTOCOL", "SYSTEM", "NODE", "STATE", "RTT MS", "FAILURES"), rows)
    services = summary.get("services", {})
    sip = services.get("sip")
    if sip:
        c = sip.get("counters", {})
        out.append("  sip:")
        out.append(f"    requests    {sum(v for k, v in c.items() if k.startswith('requests_in:'))}"
                   f" ({_pairs(c, 'requests_in:')})")
        out.append(f"    forwarded   {_pairs(c, 'forwarded:')}")
        out.append(f"    responses   {_pairs(c, 'responses_in:')}")
        out.append(f"    rejected    {_pairs(c, 'rejected:')}")
        out.append(f"    lookups     {sip.get('lookups', 0)} (misses {sip.get('misses', 0)})")
        out.append(f"    held        {c.get('held', 0)} (released {c.get('held_released', 0)}, "
                   f"503 after the hold {c.get('locked_rejected', 0)}, held now {sip.get('held', 0)})")
        out.append(f"    connections {sip.get('connections', 0)}")
        rl = sip.get("rate_limit")
        if rl:
            now = ", ".join(rl.get("blocked") or ()) or "none"
            out.append(f"    rate limit: {rl.get('sources_blocked', 0)} source(s) blocked now: {now} "
                       f"({rl.get('limit')} per {rl.get('window')} s; blocks since start {rl.get('blocks_total', 0)})")
    for name, keys in (("radius", ("requests", "answers", "duplicates", "held")),
                       ("diameter", ("requests", "answers", "held", "sessions"))):
        st = services.get(name)
        if st:
            out.append(f"  {name}: " + ", ".join(f"{k} {st.get(k, 0)}" for k in keys)
                       + (f", dropped {_pairs(st.get('drops') or {}, '')}" if st.get("drops") else ""))
    api = services.get("api")
    if api:
        m = api.get("metrics", {})
        out.append(f"  api: requests {m.get('requests', 0)}, to {_pairs(m, 'to_')}, "
                   f"logins {m.get('logins', 0)}, held {m.get('held', 0)}, faults {m.get('faults', 0)}")
    return out
