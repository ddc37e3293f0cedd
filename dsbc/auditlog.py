"""`dsbc audit`: read the migration audit log (SPEC 1: who, when, from, to, batch id).

    dsbc audit                        the last 50 entries, oldest first
    dsbc audit --batch b-...          every customer a batch moved
    dsbc audit --customer 42          one customer's moves (among the last 100,000 entries)
    dsbc audit ... --json             one JSON object per line

Exit 0 with entries, 1 when none matched (an unknown batch or a customer never moved).
"""

from __future__ import annotations

import json
import time

import click

from .store import AuditEntry

SCAN = 100_000  # entries searched for one customer's history


def _line(e: AuditEntry) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.ts))
    note = f"  ({e.note})" if e.note else ""
    return f"{when}  {e.batch_id}  {e.who}  customer {e.customer_id}  {e.from_system} -> {e.to_system}{note}"


def _audit_command() -> click.Command:
    from .cli import config_options, load_cli_config, open_cli_store
    from .migrate import check_customer_id

    @click.command("audit")
    @click.option("--batch", "batch_id", default=None, help="Every entry of this batch.")
    @click.option("--customer", "customer_id", default=None,
                  help=f"This customer's moves (searched among the last {SCAN:,} entries).")
    @click.option("--limit", type=click.IntRange(min=1, max=SCAN), default=50, show_default=True,
                  help="At most this many entries, the newest (not with --batch).")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
    @config_options
    def audit_command(batch_id: str | None, customer_id: str | None, limit: int, as_json: bool) -> int:
        """Print the migration audit log: who moved which customer, when, from, to, batch."""
        cfg = load_cli_config(store_only=True)
        cid = check_customer_id(customer_id, "--customer") if customer_id is not None else None
        if batch_id is not None and not batch_id.strip():
            raise click.BadParameter("'' is not a batch id", param_hint="'--batch'")
        ctx = click.get_current_context()
        if batch_id is not None and ctx.get_parameter_source("limit") is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError("--limit does not go with --batch (a batch's entries are all shown)")
        with open_cli_store(cfg) as store:
            if batch_id is not None:
                entries = store.audit(batch_id.strip(), limit=10_000_000)
            else:
                entries = store.audit(limit=SCAN if cid is not None else limit)
        if cid is not None:
            entries = [e for e in entries if e.customer_id == cid]
            if batch_id is None:
                entries = entries[-limit:]
        for e in entries:
            if as_json:
                click.echo(json.dumps({"ts": e.ts, "batch_id": e.batch_id, "who": e.who,
                                       "customer_id": e.customer_id, "from": e.from_system,
                                       "to": e.to_system, "note": e.note}))
            else:
                click.echo(_line(e))
        if not entries:
            what = f"batch {batch_id}" if batch_id else f"customer {cid}" if cid else "the store"
            click.echo(f"no audit entries for {what}", err=True)
            return 1
        return 0

    return audit_command


audit_command = _audit_command()
