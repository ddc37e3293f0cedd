"""dsbc/metrics.py: worker snapshots summed, the Prometheus text (checked with
prometheus_client's own parser), and the readable lines of `dsbc status`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from dsbc.metrics import read_snapshots, render, status_lines, summarize

# the reference parser of the text format (prometheus_client is not a dependency of dsbc)
text_string_to_metric_families = pytest.importorskip("prometheus_client.parser").text_string_to_metric_families


def snapshot(worker: int, invites: int, *, up: bool = True, healthy: bool = True, gap: int = 0) -> dict[str, Any]:
    return {
        "worker": worker, "pid": 100 + worker, "ts": time.time(), "store_healthy": healthy,
        "store": {"kind": "redis", "healthy": healthy, "reason": "" if healthy else "cannot reach redis://x",
                  "seq_applied": 10 - gap, "seq_remote": 10, "seq_gap": gap, "since_change": 1.5,
                  "since_probe": 0.4},
        "services": {
            "sip": {
                "counters": {"requests_in:INVITE": invites, "requests_in:REGISTER": 3, "forwarded:source": 2,
                             "forwarded:target": invites, "rejected:503": 1, "held": 2, "held_released": 2,
                             "responses_in:2xx": 5, "send_errors": 1, "bad_requests:400": 1},
                "held": 1, "connections": 4, "lookups": 7, "misses": 1,
                "nodes": [{"system": "source", "node": "udp:10.0.0.1:5060", "up": True, "rtt_ms": 1.0, "failures": 0},
                          {"system": "target", "node": "udp:10.0.0.2:5060", "up": up, "rtt_ms": 3.0, "failures": 2}],
            },
            **({"radius": {"requests": 5, "answers": 4, "duplicates": 1, "held": 0, "drops": {"unknown_client": 2},
                           "accounting_sessions": 3, "send_errors": 0,
                           "systems": {"source": {"requests": 3, "answers": 3, "timeouts": 0,
                                                  "servers": {"10.0.0.1:1812": "up"}},
                                       "target": {"requests": 2, "answers": 1, "timeouts": 1,
                                                  "servers": {"10.0.0.2:1812": "dead"}}}},
                "api": {"metrics": {"requests": 9, "to_source": 4, "to_target": 5, "faults": 1,
                                    "backend_errors": 3},
                        "backends": {"source": {"healthy": True, "errors": 0},
                                     "target": {"healthy": False, "errors": 3}}},
                "control": {"listen": "127.0.0.1:8080"}} if worker == 0 else {}),
        },
    }


def test_summarize_adds_workers_up() -> None:
    s = summarize([snapshot(0, 10), snapshot(1, 5, up=False, healthy=False, gap=3)])
    sip = s["services"]["sip"]
    assert (s["workers"], s["sip_workers"]) == (2, 2)
    assert sip["counters"]["requests_in:INVITE"] == 15 and sip["lookups"] == 14 and sip["held"] == 2
    target = next(n for n in sip["nodes"] if n["system"] == "target")
    assert target == {"system": "target", "node": "udp:10.0.0.2:5060", "up": False, "rtt_ms": 3.0, "failures": 4}
    assert s["store"]["healthy"] is False and s["store"]["seq_gap"] == 3 and s["store"]["seq_applied"] == 7
    assert s["store"]["reasons"] == ["cannot reach redis://x"]
    assert s["services"]["radius"]["requests"] == 5


def test_prometheus_text_parses_and_names_things_well() -> None:
    text = render(summarize([snapshot(0, 10), snapshot(1, 5)]),
                  {"up": True, "counts": {"customers.source.active": 7, "customers.target.locked": 1,
                                          "identities": 20, "registrations": 4},
                   "migrations": {"target": 2}, "moved": {"target": 30}, "rollbacks": 1,
                   "last_batch_ts": 1700000000.5})
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    types: dict[str, str] = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for sm in fam.samples:
            samples[(sm.name, tuple(sorted(sm.labels.items())))] = sm.value
    assert samples[("dsbc_sip_requests_total", (("method", "INVITE"),))] == 15
    assert samples[("dsbc_sip_forwarded_total", (("system", "target"),))] == 15
    assert samples[("dsbc_sip_rejected_total", (("reason", "503"),))] == 2
    assert samples[("dsbc_sip_held_total", ())] == 4
    assert samples[("dsbc_sip_lookup_misses_total", ())] == 2
    assert samples[("dsbc_backend_up", (("node", "udp:10.0.0.2:5060"), ("protocol", "sip"), ("system", "target")))] == 1
    assert samples[("dsbc_backend_rtt_seconds", (("node", "udp:10.0.0.1:5060"), ("protocol", "sip"),
                                                 ("system", "source")))] == 0.001
    assert samples[("dsbc_backend_up", (("node", "10.0.0.2:1812"), ("protocol", "radius"), ("system", "target")))] == 0
    assert samples[("dsbc_backend_up", (("node", "target"), ("protocol", "api"), ("system", "target")))] == 0
    assert samples[("dsbc_api_forwarded_total", (("system", "target"),))] == 5
    assert samples[("dsbc_radius_dropped_total", (("reason", "unknown_client"),))] == 2
    assert samples[("dsbc_store_healthy", ())] == 1
    assert samples[("dsbc_store_change_seq", (("which", "store"),))] == 10
    assert samples[("dsbc_customers", (("state", "active"), ("system", "source")))] == 7
    assert samples[("dsbc_migrated_customers_total", (("to", "target"),))] == 30
    assert types["dsbc_sip_requests"] == "counter" and types["dsbc_backend_up"] == "gauge"


def test_regression_the_registration_hand_over_shows_in_the_metrics() -> None:
    """Found by an audit: during a hand-over (SPEC 6) /metrics showed one unchanging
    dsbc_registrations, not how many phones were on each system, nor the customers prepared
    (`dsbc status` showed those) nor, until the first one, the capped registrations."""
    text = render(summarize([snapshot(0, 1)]),
                  {"up": True, "counts": {"registrations": 4, "registrations.source": 1,
                                          "registrations.target": 3, "prepared": 2}})
    samples = {(sm.name, tuple(sorted(sm.labels.items()))): sm.value
               for fam in text_string_to_metric_families(text) for sm in fam.samples}
    assert samples[("dsbc_registrations", ())] == 4
    assert samples[("dsbc_registrations_by_system", (("system", "source"),))] == 1
    assert samples[("dsbc_registrations_by_system", (("system", "target"),))] == 3
    assert samples[("dsbc_customers_prepared", ())] == 2
    assert samples[("dsbc_sip_registrations_capped_total", ())] == 0


def test_label_values_are_escaped() -> None:
    snap = snapshot(0, 1)
    snap["services"]["sip"]["counters"]['requests_in:IN"VI\\TE'] = 1
    text = render(summarize([snap]))
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert any(s.labels.get("method") == 'IN"VI\\TE' for s in fams["dsbc_sip_requests"].samples)


def test_read_snapshots_skips_stale_and_broken(tmp_path: Path) -> None:
    (tmp_path / "worker-0.json").write_text(json.dumps(snapshot(0, 1)))
    old = snapshot(1, 1)
    old["ts"] = time.time() - 60
    (tmp_path / "worker-1.json").write_text(json.dumps(old))
    (tmp_path / "worker-2.json").write_text("{half")
    assert [s["worker"] for s in read_snapshots(tmp_path)] == [0]
    assert read_snapshots(None) == []


def test_status_lines_are_a_readable_table() -> None:
    lines = status_lines({"node": summarize([snapshot(0, 10, up=False)]), "uptime": 12, "pid": 7,
                          "store": {"healthy": True}})
    text = "\n".join(lines)
    assert lines[0] == "  workers: 1 (1 SIP), up 12 s"
    assert "  store: healthy; change 10 applied, gap 0, last contact 0.4 s ago" in lines
    assert "PROTOCOL  SYSTEM  NODE" in text and "DOWN" in text
    assert "    requests    13 (INVITE 10, REGISTER 3)" in lines
    assert "    forwarded   target 10, source 2" in lines
    assert "  radius: requests 5, answers 4, duplicates 1, held 0, dropped unknown_client 2" in lines


def test_no_family_mixes_a_total_with_labelled_series() -> None:
    """Found by an audit: dsbc_api_backend_errors_total came both without labels (the
    dispatcher's total) and per system, so sum() and rate() over it counted every error
    twice.  Every family's series carry the same label names."""
    text = render(summarize([snapshot(0, 10), snapshot(1, 5)]), {"up": True})
    for fam in text_string_to_metric_families(text):
        if fam.type in ("histogram", "summary"):
            continue
        names = {tuple(sorted(sm.labels)) for sm in fam.samples}
        assert len(names) == 1, (fam.name, names)
    samples = {(sm.name, tuple(sorted(sm.labels.items()))): sm.value
               for fam in text_string_to_metric_families(text) for sm in fam.samples}
    assert samples[("dsbc_api_backend_unavailable_total", ())] == 3
    assert samples[("dsbc_api_backend_errors_total", (("system", "target"),))] == 3


def test_a_gone_workers_counters_are_kept_not_its_gauges() -> None:
    """`retire` keeps the counters of a worker's last snapshot (folded by the master when
    the worker exits) and `render` adds them to the live ones: /metrics never goes back."""
    from dsbc.metrics import retire, worker_key

    gone = snapshot(1, 7)
    retired = retire(retire({}, snapshot(0, 3)), gone)
    assert retired["folded"] == ["100@", "101@"]
    live = {**snapshot(1, 1), "started": 5.0}  # pid 101 again: another process
    assert worker_key(live) not in retired["folded"]
    fams = retired["families"]
    assert "dsbc_sip_held" not in fams and "dsbc_backend_up" not in fams  # gauges
    text = render(summarize([snapshot(0, 2)]), {"rollbacks": 1}, retired)
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(text) for s in f.samples}
    assert values[("dsbc_sip_requests_total", (("method", "INVITE"),))] == 3 + 7 + 2
    assert values[("dsbc_sip_held", ())] == 1  # the live worker's only
    assert values[("dsbc_radius_requests_total", ())] == 5 * 2  # worker 0 has the RADIUS service
    assert values[("dsbc_api_forwarded_total", (("system", "target"),))] == 5 * 2  # worker 0's twice
    assert text.count("# TYPE dsbc_sip_requests_total ") == 1


def test_a_new_node_does_not_count_what_a_killed_one_left_behind(tmp_path: Path) -> None:
    """DSBC_RUN_DIR is fixed (/run/dsbc in deploy/dsbc.service): a node killed outright
    leaves its gone workers' counters there, and the next one started by hand must not add
    them to its own."""
    import urllib.request

    from dsbc.metrics import RETIRED
    from tests.peers.dsbc import Dsbc

    d = Dsbc(tmp_path / "node")
    d.run_dir.mkdir(parents=True)
    (d.run_dir / RETIRED).write_text(json.dumps({"folded": ["1@"], "families": {
        "dsbc_sip_requests_total": ["SIP requests", {json.dumps([["method", "INVITE"]]): 12345}]}}))
    with d, urllib.request.urlopen(d.control_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert "12345" not in text


def test_dsbc_status_keeps_a_gone_workers_totals_not_its_gauges() -> None:
    """`dsbc status` (GET /v1/status) counted the live workers only: its totals went back
    at every reload.  The gone workers' totals are added as /metrics adds them."""
    from dsbc.metrics import retire, with_retired

    retired = retire({}, snapshot(0, 7))
    s = with_retired(summarize([snapshot(0, 2)]), retired)
    sip = s["services"]["sip"]
    assert sip["counters"]["requests_in:INVITE"] == 9 and sip["lookups"] == 14
    assert (sip["held"], sip["connections"]) == (1, 4)  # gauges: the live worker's only
    assert s["services"]["radius"]["requests"] == 10 and s["services"]["radius"]["accounting_sessions"] == 3
    assert s["services"]["api"]["metrics"]["to_target"] == 10
    lines = "\n".join(status_lines({"node": s}))
    assert "requests    15 " in lines  # INVITE 9 + REGISTER 3 + 3
