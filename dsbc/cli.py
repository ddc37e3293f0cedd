"""``dsbc``: the operator's command line.

Every command takes ``-c/--config FILE`` (default ``$DSBC_CONFIG`` or ``./dsbc.toml``);
commands that need only the store also accept ``--store URL`` when there is no config
file.  Exit status: 0 success, 1 done-but-not-all (some unknown ids among known ones,
a registration wait that timed out, an unknown identity for ``where``, a store that
cannot be written), 2 bad usage or bad input (only unknown customer ids included),
always with one line on stderr and no traceback.

Other modules add commands (``run``, ``demo``, ``replay``, ``audit``): `_PLUGINS` names them, and
they are imported only when asked for (``dsbc where`` does not import the runner).
Use `config_options` and `load_cli_config` in them for the same ``-c`` handling.
"""

from __future__ import annotations

import contextlib
import getpass
import importlib
import json
import math
import os
import signal
import sys
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from .config import Config, ConfigError, load_config
from .control_client import NodeError
from .imports import InputError, import_refusal, keep_stored_groups, read_customers
from .migrate import (
    BatchAborted,
    Progress,
    check_batch,
    check_customer_id,
    longest_registration,
    move_batch,
    phones_by_account,
    phones_on,
    read_batch,
    summary,
)
from .migrate import wait_registrations as wait_for_phones
from .store import (
    BadIdentity,
    BatchCancelled,
    Customer,
    LocationStore,
    LockedByBatch,
    MigrationResult,
    StoreError,
    StoreUnavailable,
    open_store,
    parse_identity,
    some,
)

_PLUGINS = ["dsbc.runner:run_command", "dsbc.demo:demo_command", "dsbc.replay:replay_command",
            "dsbc.auditlog:audit_command"]

F = TypeVar("F", bound=Callable[..., Any])


class CliError(Exception):
    """A user error: one line on stderr, then exit with `code`."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class FiniteFloat(click.FloatRange):
    """A FloatRange that refuses nan and inf (click's accepts both: `--lock-for inf` ended
    in a traceback from time.sleep, `--lock-for nan` did not wait at all)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if isinstance(rv, float) and not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


def _fail(message: str, code: int) -> NoReturn:
    click.echo(" ".join(message.split("\n")).strip(), err=True)
    sys.exit(code)


class DsbcGroup(click.Group):
    """Loads plugin commands on demand and turns every user error into one stderr line."""

    _plugins_loaded = False

    def _load_plugins(self) -> None:
        if DsbcGroup._plugins_loaded:
            return
        DsbcGroup._plugins_loaded = True
        for spec in _PLUGINS:
            module, _, attr = spec.partition(":")
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name == module:  # not written yet; anything else missing is a real error
                    continue
                raise
            self.add_command(getattr(mod, attr))

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugins()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is None:
            self._load_plugins()
            cmd = super().get_command(ctx, cmd_name)
        return cmd

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        for arg in sys.argv[1:] if args is None else args:
            try:
                str(arg).encode()
            except UnicodeEncodeError:  # octets that are not UTF-8 (a Latin-1 terminal)
                _fail(f"dsbc: the argument {str(arg).encode(errors='surrogateescape')!r} is not "
                      "UTF-8 text", 2)
        try:
            rv = super().main(
                args, prog_name or "dsbc", complete_var, standalone_mode=False, **extra
            )
        except click.UsageError as exc:
            no_args = getattr(click.exceptions, "NoArgsIsHelpError", ())
            if no_args and isinstance(exc, no_args) and exc.ctx is not None:
                click.echo(exc.ctx.get_help())  # plain `dsbc`: the help, not an error
                rv = 0
            else:
                where = exc.ctx.command_path if exc.ctx is not None else "dsbc"
                _fail(f"{where}: {exc.format_message()} (see {where} --help)", 2)
        except click.Abort:
            _fail("interrupted", 130)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except CliError as exc:
            _fail(str(exc), exc.code)
        except NodeError as exc:  # --node URL that is not one (a call's errors are CliErrors)
            _fail(str(exc), exc.code)
        except (StoreUnavailable, BatchAborted, LockedByBatch, BatchCancelled) as exc:
            _fail(str(exc), 1)
        except (ConfigError, InputError, BadIdentity, StoreError) as exc:
            _fail(str(exc), 2)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


# --- config and store ---------------------------------------------------------------------


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None:
        ctx.find_root().meta[f"dsbc.{param.name}"] = value
    return value


def config_options(f: F) -> F:
    """``-c/--config FILE`` and ``--store URL``, accepted before or after the command name."""
    return config_options_with(
        "Config file (default: $DSBC_CONFIG or ./dsbc.toml).",
        "Store URL (overrides store.url; enough without a config file for commands that only need the store).",
    )(f)


def config_options_with(config_help: str, store_help: str) -> Callable[[F], F]:
    """`config_options` with help texts of the command's own (one that refuses them says so)."""

    def decorate(f: F) -> F:
        f = click.option("--store", "store", metavar="URL", expose_value=False, callback=_remember,
                         help=store_help)(f)
        return click.option("-c", "--config", "config", metavar="FILE", expose_value=False,
                            callback=_remember, help=config_help)(f)

    return decorate


def load_cli_config(store_only: bool = False) -> Config:
    """The config named by -c, $DSBC_CONFIG or ./dsbc.toml, with --store applied.

    With `store_only`, a missing default file is fine when --store is given."""
    meta = click.get_current_context().find_root().meta
    path = meta.get("dsbc.config") or os.environ.get("DSBC_CONFIG") or "dsbc.toml"
    store_url = meta.get("dsbc.store")
    if os.path.exists(path):
        cfg = load_config(path)
    elif store_only and store_url and "dsbc.config" not in meta:
        cfg = Config()
    else:
        hint = " or --store URL" if store_only else ""
        raise CliError(f"{path}: no such file (give -c FILE{hint})")
    if store_url:
        cfg.store.url = store_url
    return cfg


def open_cli_store(cfg: Config, create: bool = False) -> LocationStore:
    """The store without its in-memory index (one-shot commands read SQLite directly);
    only `dsbc import` creates a store that does not exist yet."""
    if cfg.store.url.lower().startswith("sqlite:") and cfg.store.url.endswith(":memory:"):
        raise CliError(f"store {cfg.store.url}: a store in memory keeps nothing past this command "
                       "(give a file: sqlite:///path/location.db)")
    return open_store(cfg.store.url, cfg.store.unknown, load=False, create=create)


def system_label(cfg: Config, system: str) -> str:
    """``target (MR115)`` when the system has a name."""
    name = cfg.system(system).name if system in ("source", "target") else ""
    return f"{system} ({name})" if name else system


@contextlib.contextmanager
def _stop_signals_interrupt() -> Any:
    """SIGTERM and SIGHUP (a closed ssh session, `timeout`, systemd) interrupt like Ctrl-C
    while a batch is being moved, so the customers it locked are unlocked again instead of
    staying `locked` (held, then 503) until someone notices.  A signal already ignored
    (nohup) stays ignored."""

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue
            old[sig] = signal.signal(sig, interrupt)
        except (ValueError, OSError):  # not the main thread
            pass
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


def _default_who() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "cli"


def _progress(total: int, label: str) -> Progress:
    return Progress(total, label, sys.stderr, enabled=sys.stderr.isatty() and total > 0)


def node_option(f: F) -> F:
    """``--node URL``: act through a running node's control API instead of the store."""
    return click.option(
        "--node",
        "node",
        metavar="URL",
        default=None,
        envvar="DSBC_NODE",
        help="Act through the control API of a running node (URL, or 'local' for this "
        "host's control.listen; token: control.token or $DSBC_CONTROL_TOKEN).",
    )(f)


def _node_client(cfg: Config, node: str) -> Any:
    from .control_client import NodeClient, node_token, node_url

    return NodeClient(node_url(cfg, node), node_token(cfg))


def _node_call(fn: Callable[[], Any]) -> Any:
    from .control_client import NodeError

    try:
        return fn()
    except NodeError as exc:
        raise CliError(str(exc), exc.code) from None


def _node_result(data: dict[str, Any], to: str, dry_run: bool = False) -> MigrationResult:
    return MigrationResult(
        str(data.get("batch_id", "")),
        str(data.get("to", to)),
        [str(x) for x in data.get("moved", [])],
        [str(x) for x in data.get("already", [])],
        [str(x) for x in data.get("unknown", [])],
        dry_run,
        str(data.get("warning") or ""),
    )


def _warn(result: MigrationResult) -> None:
    """A committed change the store could not yet make safe (no Redis replica has it)."""
    if result.warning:
        click.echo(f"warning: {result.warning}", err=True)


# --- commands -----------------------------------------------------------------------------


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import PackageNotFoundError, version

    from sip._pure import build

    try:
        release = version("dsbc-dispatcher")
    except PackageNotFoundError:
        release = "unknown (not installed)"
    click.echo(f"dsbc {release}, Python {sys.version.split()[0]}, SIP core and API fast path: {build()}")
    ctx.exit()


@click.group("dsbc", cls=DsbcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version, help="Show the version and whether the SIP core and API fast path are compiled.")
@config_options
def main() -> None:
    """dsbc: a dispatching session border controller for dual-version migrations."""


@main.command("import")
@click.argument("file")
@config_options
def import_command(file: str) -> None:
    """Load customers and identities from FILE (CSV or JSON lines; - reads standard input).

    CSV header: customer_id, identities (kind:value;kind:value), system (optional,
    default source; a stored customer keeps its system: a row naming another system for
    it is refused, `dsbc migrate` moves customers), group (optional)."""
    cfg = load_cli_config(store_only=True)
    lines: dict[str, int] = {}
    grouped: set[str] = set()
    rows = read_customers(file, lines, grouped)
    with open_cli_store(cfg, create=True) as store:
        rows = keep_stored_groups(store, rows, grouped)
        refusal = import_refusal(store, rows)
        if refusal is not None:
            row, why, count = refusal
            more = f" (and {count - 1} more)" if count > 1 else ""
            raise InputError(f"{file}:{lines.get(row.customer_id, 0)}: {why}{more}; nothing was imported")
        bar = _progress(len(rows), "import")
        try:
            n = store.import_rows(rows, bar)
        finally:
            bar.close()
    click.echo(f"imported {n} customers, {sum(len(r.identities) for r in rows)} identities")


@main.command()
@click.argument("identity", metavar="KIND:VALUE")
@node_option
@config_options
def where(identity: str, node: str | None) -> int:
    """Print the customer, system and state that own an identity (exit 1 if unknown)."""
    cfg = load_cli_config(store_only=True)
    kind, value = parse_identity(identity)
    c: Customer | None = None
    policy = cfg.store.unknown
    if node is not None:  # what that node's memory says (the index it dispatches with)
        client = _node_client(cfg, node)
        found, node_policy = _node_call(lambda: client.identity(kind, value))
        if node_policy in ("source", "target", "reject"):  # the node's store.unknown, not ours
            policy = node_policy
        if found is not None:
            c = Customer(
                str(found["customer_id"]), str(found["system"]), str(found["state"]),
                str(found.get("group", "")), str(found.get("batch_id", "")),
                int(found.get("expires_cap", 0)),
            )
    else:
        with open_cli_store(cfg) as store:
            loc = store.lookup(kind, value)
            c = store.customer(loc.customer_id) if loc is not None else None
    if c is None:
        if policy == "reject":
            click.echo(f"{kind}:{value}: unknown: would be rejected (store.unknown)")
        else:
            click.echo(
                f"{kind}:{value}: unknown: would go to {system_label(cfg, policy)} (store.unknown)"
            )
        return 1
    click.echo(f"identity: {kind}:{value}")
    click.echo(f"customer: {c.customer_id}")
    click.echo(f"system:   {system_label(cfg, c.system)}")
    click.echo(f"state:    {c.state}")
    if c.group:
        click.echo(f"group:    {c.group}")
    if c.batch_id:
        click.echo(f"batch:    {c.batch_id}")
    if c.expires_cap:
        click.echo(f"expires:  capped at {c.expires_cap} s (migration prepared)")
    return 0


@main.command()
@click.option(
    "--customer",
    "customers",
    multiple=True,
    metavar="ID",
    help="A customer to move; more ids may follow (--customer 1 2 3) or the option repeat.",
)
@click.argument("more_ids", nargs=-1, metavar="[ID]...")
@click.option(
    "--batch",
    "batch_file",
    metavar="FILE",
    help="Customer ids, one per line, or CSV with customer_id (- reads standard input).",
)
@click.option(
    "--to", "to", type=click.Choice(["target", "source"], case_sensitive=False), default="target", show_default=True
)
@click.option("--dry-run", is_flag=True, help="Check everything and report; change nothing.")
@click.option(
    "--prepare",
    is_flag=True,
    help="Only cap the phones' registration expiry (sip.migration_expires).",
)
@click.option(
    "--unprepare",
    is_flag=True,
    help="Undo --prepare (the batch is postponed): the phones get their usual expiry again.",
)
@click.option(
    "--wait-registrations",
    is_flag=True,
    help="After the flip, wait until the phones registered on the new system.",
)
@click.option(
    "--timeout",
    type=FiniteFloat(min=0),
    metavar="SECONDS",
    help="For --wait-registrations (default: 2 x sip.migration_expires).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Customers per transaction.",
)
@click.option(
    "--lock-for",
    type=FiniteFloat(min=0, max=600),
    default=0.0,
    metavar="SECONDS",
    help="Lock the batch, wait this long (a data-copy window, at most 600 s), then flip.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Take over customers another batch holds locked (only when that migration died "
    "and left them locked).",
)
@click.option(
    "--who", default=None, help="Name recorded in the audit log (default: your user name)."
)
@node_option
@config_options
def migrate(
    customers: tuple[str, ...],
    more_ids: tuple[str, ...],
    batch_file: str | None,
    to: str,
    dry_run: bool,
    prepare: bool,
    unprepare: bool,
    wait_registrations: bool,
    timeout: float | None,
    batch_size: int,
    lock_for: float,
    force: bool,
    who: str | None,
    node: str | None,
) -> int:
    """Move customers atomically to the other system (exit 1 if some ids are unknown, 2 if all)."""
    customers += more_ids  # SPEC 3 writes ``--customer ID ...``: the ids after the first
    if customers and batch_file:
        raise click.UsageError("give --customer ID (one or more) or --batch FILE, not both")
    if not customers and not batch_file:
        raise click.UsageError("give --customer ID (one or more) or --batch FILE")
    if prepare and unprepare:
        raise click.UsageError("give --prepare or --unprepare, not both")
    if timeout is not None and not wait_registrations:  # silently ignored, it waited for nothing
        raise click.UsageError("--timeout goes with --wait-registrations")
    if (prepare or unprepare) and (wait_registrations or lock_for):
        raise click.UsageError("--prepare and --unprepare only set the expiry cap: run the flip "
                               "as a second command")
    ids = (
        read_batch(batch_file)
        if batch_file
        else list(dict.fromkeys(check_customer_id(c, "--customer") for c in customers))
    )
    cfg = load_cli_config(store_only=not (prepare or wait_registrations))
    who = who or _default_who()
    if node is not None:
        if wait_registrations:
            raise click.UsageError("--wait-registrations needs the store: run it without --node")
        return _migrate_through_node(cfg, node, ids, to, who, dry_run, prepare, batch_size, lock_for, force,
                                     unprepare)
    with open_cli_store(cfg) as store:
        if dry_run or prepare or unprepare:
            return _check_or_prepare(cfg, store, ids, to, who, (prepare or unprepare) and not dry_run, force,
                                     unprepare)
        try:
            expected = phones_by_account(store, ids)  # before the flip: who is registered now
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"migration refused: {exc}; nothing was changed") from None
        bar = _progress(len(ids), f"migrate to {to}")
        try:
            with _stop_signals_interrupt():
                result = move_batch(
                    store, ids, to, who=who, batch_size=batch_size, lock_for=lock_for, force=force,
                    progress=bar, lease=cfg.store.lock_lease,
                )
        finally:
            bar.close()
        known = result.moved + result.already
        want = sum(expected.values())
        _warn(result)
        try:  # the batch committed: a store gone away now only leaves the count unknown
            on = phones_on(store, known, to, expected)
            click.echo(summary(result, (on, want)))
        except StoreUnavailable as exc:
            on = 0
            click.echo(summary(result))
            click.echo(f"cannot count the registered phones: {exc}", err=True)
        status = _report_unknown(result.unknown, len(known))
        if wait_registrations and on < want:
            limit = 2.0 * cfg.sip.migration_expires if timeout is None else timeout
            bar = Progress(want, f"registered on {to}", sys.stderr, enabled=sys.stderr.isatty())
            try:
                count = wait_for_phones(store, known, to, expected, limit, bar, resize=bar.resize)
            finally:
                bar.close()
            gone = want - count.of
            note = (f" ({gone} other phone(s) expired on {'source' if to == 'target' else 'target'} "
                    "without registering again: switched off?)") if gone else ""
            if count.on < count.of:
                click.echo(
                    f"timeout after {limit:g} s: {count.on}/{count.of} phones registered on {to}{note}",
                    err=True,
                )
                return 1
            click.echo(f"all {count.of} phones registered on {to}{note}")
        elif wait_registrations and want:
            # every phone was on the new system by the time of the count: the same verdict
            click.echo(f"all {want} phones registered on {to}")
    return status


def _report_unknown(unknown: list[str], known: int) -> int:
    """The exit status of a migration that named ``unknown`` ids: 0 none, 1 some (the
    ``known`` others were done), 2 nothing but unknown ids (bad input, nothing to do)."""
    if not unknown:
        return 0
    click.echo(f"unknown customer(s): {some(unknown)}", err=True)
    return 1 if known else 2


def _check_or_prepare(
    cfg: Config, store: LocationStore, ids: list[str], to: str, who: str, prepare: bool,
    force: bool = False, unprepare: bool = False,
) -> int:
    # GroupSplitError: exit 2; LockedByBatch (a dry run checks what the run would): exit 1
    check = (store.migrate(ids, to, who=who, dry_run=True) if prepare
             else check_batch(store, ids, to, who=who, force=force))
    if prepare and unprepare:  # every known customer: the cap of a batch prepared either way
        store.prepare(check.moved + check.already, 0)
        _unprepared(check)
    elif prepare:
        expires = cfg.sip.migration_expires
        store.prepare(check.moved, expires)
        _prepared(check, expires, longest_registration(store, check.moved))
    else:
        click.echo(summary(check))
        if check.moved:
            click.echo(f"would move: {some(check.moved)}")
    return _report_unknown(check.unknown, len(check.moved) + len(check.already))


def _prepared(check: MigrationResult, expires: int, wait: float, through: str = "") -> None:
    """What `dsbc migrate --prepare` did, and how long to wait before the flip."""
    to = check.to
    click.echo(
        f"registration expiry capped at {expires} s for {len(check.moved)} customers "
        f"(already on {to} {len(check.already)}, unknown {len(check.unknown)}){through}"
    )
    if wait > 0:
        click.echo(
            f"wait {wait:.0f} s for their phones to re-register with the cap, then migrate: "
            f"phones will re-register within {expires} s of the flip"
        )
    else:
        click.echo(
            f"no phone of the batch is registered now: phones will re-register within "
            f"{expires} s of the flip"
        )


def _unprepared(check: MigrationResult, through: str = "") -> None:
    click.echo(
        f"registration expiry cap cleared for {len(check.moved) + len(check.already)} customers "
        f"(unknown {len(check.unknown)}){through}: their phones get their usual expiry at their "
        f"next registration"
    )


def _migrate_through_node(
    cfg: Config, node: str, ids: list[str], to: str, who: str, dry_run: bool, prepare: bool,
    batch_size: int, lock_for: float, force: bool, unprepare: bool = False,
) -> int:
    client = _node_client(cfg, node)
    body: dict[str, Any] = {"customers": ids, "to": to, "who": who, "batch_size": batch_size}
    if force:
        body["force"] = True
    if dry_run:
        body["dry_run"] = True
    if prepare:
        body["prepare"] = True
    if unprepare:
        body["unprepare"] = True
    if lock_for:
        body["lock_for"] = lock_for
    data = _node_call(lambda: client.call("POST", "/v1/migrations", body))
    result = _node_result(data, to, dry_run=bool(data.get("dry_run")))
    if unprepare and not dry_run:
        _unprepared(result, f" (through {client.base})")
    elif prepare and not dry_run:
        _prepared(result, int(data.get("expires", 0)), float(data.get("wait", 0)), f" (through {client.base})")
    else:
        reg = data.get("registered")
        phones = (int(reg.get("on", 0)), int(reg.get("of", 0))) if isinstance(reg, dict) else None
        click.echo(f"{summary(result, phones)} (through {client.base})")
        _warn(result)
        if result.dry_run and result.moved:
            click.echo(f"would move: {some(result.moved)}")
    return _report_unknown(result.unknown, len(result.moved) + len(result.already))


@main.command()
@click.argument("batch_id")
@click.option(
    "--who", default=None, help="Name recorded in the audit log (default: your user name)."
)
@node_option
@config_options
def rollback(batch_id: str, who: str | None, node: str | None) -> int:
    """Move the customers of a batch back to where they came from (a new batch)."""
    cfg = load_cli_config(store_only=True)
    if node is not None:
        client = _node_client(cfg, node)
        bid = urllib.parse.quote(batch_id.strip(), safe="")
        data = _node_call(lambda: client.call(
            "POST", f"/v1/migrations/{bid}/rollback", {"who": who or _default_who()}))
        r = _node_result(data, "")
        click.echo(f"rolled back {batch_id}: {summary(r)} (through {client.base})")
        _warn(r)
        return 0
    with open_cli_store(cfg) as store:
        r = store.rollback(batch_id.strip(), who=who or _default_who())
    click.echo(f"rolled back {batch_id}: {summary(r)}")
    _warn(r)
    return 0


# --- status -------------------------------------------------------------------------------


def _shown_url(url: str) -> str:
    """A store URL without its password."""
    if url.startswith(("redis", "rediss")):
        from .store.redis_conn import parse_redis_url

        try:
            return parse_redis_url(url).display
        except StoreError:
            return url
    return url


def collect_status(cfg: Config, node: str | None = None) -> dict[str, Any]:
    """Everything `dsbc status` shows, as data: the running node (GET /v1/status of its
    control API: this host's control.listen, or `node`) and the store (read directly; when
    it cannot be, the node's view of it)."""
    from .control_client import NodeClient, NodeError, node_token, node_url

    out: dict[str, Any] = {"node": {"url": ""}, "store": {"url": _shown_url(cfg.store.url)}}
    try:
        base = out["node"]["url"] = node_url(cfg, node or "")
        out["node"].update(reachable=True, status=NodeClient(base, node_token(cfg)).call(
            "GET", "/v1/status", timeout=5.0))
    except NodeError as exc:
        if node and not out["node"]["url"]:
            raise  # --node that is no URL: bad usage
        out["node"].update(reachable=False, error=str(exc))
    try:
        with open_cli_store(cfg) as store:
            counts = store.counts()
            batches = [
                {"batch_id": b.batch_id, "ts": b.ts, "who": b.who, "from": b.from_system,
                 "to": b.to_system, "customers": b.customers, "note": b.note}
                for b in store.batches(10)
            ]
            locks = [{"batch_id": b, "customers": n, "lease_until": until} for b, n, until in store.locks()]
        out["store"].update(counts=counts, batches=batches, locks=locks)
    except StoreError as exc:
        remote = out["node"].get("status", {}).get("store", {})
        if "counts" in remote:
            out["store"].update(counts=remote["counts"], batches=remote.get("batches", []),
                                via_node=True, direct_error=str(exc))
        else:
            # unreachable (exit 1) or not there / not a store (bad input, exit 2), as elsewhere
            out["store"].update(error=str(exc), unavailable=isinstance(exc, StoreUnavailable))
    for b in out["store"].get("batches", []):
        b["time"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(b["ts"])))
    return out


def _by_system(counts: dict[str, Any]) -> str:
    """`` (source 12, target 30)``: where the phones are registered (a hand-over's progress);
    "" from a node that does not count them apart."""
    if "registrations.source" not in counts:
        return ""
    return f" (source {counts['registrations.source']}, target {counts.get('registrations.target', 0)})"


def _print_status(cfg: Config, st: dict[str, Any]) -> None:
    from .metrics import status_lines

    node = st["node"]
    if node.get("reachable"):
        click.echo(f"node {node['url']} (pid {node['status'].get('pid', '?')}):")
        for line in status_lines(node["status"]):
            click.echo(line)
    else:
        click.echo(node.get("error", "no running node"))
    store = st["store"]
    via = " (as the node reads it)" if store.get("via_node") else ""
    click.echo(f"store {store['url']}{via}:")
    if "error" in store:
        click.echo(f"  error: {store['error']}")
        return
    c = store["counts"]
    for system in ("source", "target"):
        click.echo(
            f"  {system_label(cfg, system)}: {c[f'customers.{system}.active']} active, "
            f"{c[f'customers.{system}.locked']} locked"
        )
    click.echo(
        f"  customers {c['customers']}, identities {c['identities']}, groups {c['groups']}, "
        f"prepared {c['prepared']}, registrations {c['registrations']}{_by_system(c)}, "
        f"sessions {c['sessions']}"
    )
    now = time.time()
    for lk in store.get("locks", []):
        left = float(lk["lease_until"]) - now
        lease = (f"lease ends in {left:.0f} s unless its migration renews it" if left > 0 else
                 "lease ended, its migration stopped: released by a running node or the next migration")
        click.echo(f"  locked by batch {lk['batch_id']}: {lk['customers']} customers ({lease}; "
                   f"dsbc rollback {lk['batch_id']} releases them now)")
    if store["batches"]:
        click.echo("recent batches:")
        for b in store["batches"]:
            note = f" ({b['note']})" if b["note"] else ""
            click.echo(
                f"  {b['batch_id']}  {b['time']}  {b['who']}  {b['from']} -> {b['to']}  "
                f"{b['customers']} customers{note}"
            )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@node_option
@config_options
def status(as_json: bool, node: str | None) -> int:
    """Health of the running node (if any), store counts and recent batches."""
    cfg = load_cli_config(store_only=True)
    st = collect_status(cfg, node)
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
    else:
        _print_status(cfg, st)
    if "error" in st["store"]:
        return 1 if st["store"]["unavailable"] else 2
    # a node named with --node that does not answer is a failed check (a monitoring script's
    # question); without it, a host that runs no node (an operator's desk) still reads the store
    return 1 if node and not st["node"]["reachable"] else 0


if __name__ == "__main__":
    main()
