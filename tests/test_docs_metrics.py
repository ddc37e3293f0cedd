"""docs/OPERATIONS.md section 4 names the metrics to watch and the alerts to set on them: a
node that has just started exports every one of them (with the labels the table shows), so
a dashboard has its series and `rate()` counts the first event (a counter that appears
only at its first increment, at 1, loses that increment to `rate()` and `increase()`)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.peers.net import free_port

parser = pytest.importorskip("prometheus_client.parser")

OPERATIONS = Path(__file__).resolve().parents[1] / "docs" / "OPERATIONS.md"


def documented() -> dict[str, set[str]]:
    """Metric name -> label names, from the "What to watch" table (not the `dsbc_radius_*`
    style wildcards)."""
    text = OPERATIONS.read_text()
    section = text.split("## 4. What to watch", 1)[1].split("\n## ", 1)[0]
    out: dict[str, set[str]] = {}
    for row in section.splitlines():
        if not row.startswith("| `dsbc_"):
            continue
        first = row.split("|")[1]
        for name, labels in re.findall(r"`(dsbc_[a-z_]+)(?:\{([a-z_,]+)\})?`", first):
            out[name] = set(labels.split(",")) if labels else set()
    return out


def scrape(node: Any) -> dict[str, list[Any]]:
    status, text = node.control("GET", "/metrics", token=None)
    assert status == 200
    fams: dict[str, list[Any]] = {}
    for fam in parser.text_string_to_metric_families(text):
        for sample in fam.samples:
            fams.setdefault(sample.name, []).append(sample)
    return fams


def test_a_new_node_exports_every_metric_the_runbook_names(dsbc_factory: Callable[..., Any]) -> None:
    names = documented()
    assert {"dsbc_sip_held_total", "dsbc_sip_locked_rejected_total", "dsbc_migrations_total"} <= set(names)
    node = dsbc_factory(source=[f"udp:127.0.0.1:{free_port('udp')}"],
                        target=[f"udp:127.0.0.1:{free_port('udp')}"],
                        customers=[{"customer_id": "1", "identities": ["account:1001"]}])
    deadline = time.monotonic() + 10
    fams = scrape(node)
    while "dsbc_sip_requests_total" not in fams and time.monotonic() < deadline:
        time.sleep(0.3)  # the first worker snapshot
        fams = scrape(node)
    missing = sorted(set(names) - set(fams) - {"dsbc_store_contact_age_seconds"})  # Redis only
    assert not missing, f"documented in OPERATIONS.md, not in /metrics: {missing}"
    for name, labels in names.items():
        for sample in fams.get(name, []):
            assert labels <= set(sample.labels), (name, sample.labels)
    # SECURITY.md's table of SIP counters ("The counters are in /metrics")
    security = (Path(__file__).resolve().parents[1] / "docs" / "SECURITY.md").read_text()
    assert "`dsbc_sip_rate_limited_total`" in security
    for counter in ("rate_limited", "rate_limited_answered", "scanners_dropped", "tcp_refused",
                    "tcp_stalled_closed", "tcp_idle_closed", "tls_handshake_failed", "too_large"):
        assert f"`{counter}`" in security, counter
        assert f"dsbc_sip_{counter}_total" in fams, counter
    # the alerts' counters start at 0, the per-system ones for both systems
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for n in fams for s in fams[n]}
    assert values[("dsbc_sip_locked_rejected_total", ())] == 0
    assert values[("dsbc_sip_forwarded_total", (("system", "target"),))] == 0
    assert values[("dsbc_sip_rejected_total", (("reason", "no_node"),))] == 0
    assert values[("dsbc_migrations_total", (("to", "target"),))] == 0
