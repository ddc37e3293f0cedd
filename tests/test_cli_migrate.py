"""`dsbc migrate` / `dsbc rollback` and the batch logic behind them (dsbc/migrate.py)."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from dsbc import cli
from dsbc.imports import InputError
from dsbc.migrate import (
    BatchAborted,
    Progress,
    move_batch,
    phones_by_account,
    phones_on,
    plan_chunks,
    read_batch,
    wait_registrations,
)
from dsbc.store import (
    Customer,
    GroupSplitError,
    Registration,
    StoreError,
    StoreUnavailable,
    open_store,
)
from dsbc.store.sqlite import SqliteStore


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DSBC_CONFIG", raising=False)
    (tmp_path / "dsbc.toml").write_text(
        f'[store]\nurl = "sqlite:///{tmp_path}/loc.db"\n\n[sip]\nmigration_expires = 30\n\n'
        '[systems.target]\nname = "MR115"\n')
    s = open_store(f"sqlite:///{tmp_path}/loc.db")
    rows: list[dict[str, object]] = [
        {"customer_id": str(i), "identities": [f"account:u{i}"]} for i in range(1, 11)]
    rows += [{"customer_id": f"g{i}", "identities": [f"account:g{i}"], "group": "ivr"} for i in range(1, 4)]
    s.import_rows(rows)
    s.close()
    return tmp_path


def store_at(home: Path) -> SqliteStore:
    s = open_store(f"sqlite:///{home}/loc.db")
    assert isinstance(s, SqliteStore)
    return s


def dsbc(*args: str) -> Result:
    return CliRunner().invoke(cli.main, list(args), catch_exceptions=False)


def system_of(home: Path, cid: str) -> str:
    c = store_at(home).customer(cid)
    assert c is not None
    return c.system


# --- the command --------------------------------------------------------------------------


def test_migrate_summary_and_idempotence(home: Path) -> None:
    r = dsbc("migrate", "--customer", "1", "--customer", "2", "--who", "alice")
    assert r.exit_code == 0, r.stderr
    head, batch, regs = r.stdout.strip().split("; ")
    assert head == "moved 2, already on target 0, unknown 0"
    assert batch.startswith("batch b-") and regs == "registered on target: 0/0 phones"
    assert [e.who for e in store_at(home).audit(batch[6:])] == ["alice", "alice"]
    r = dsbc("migrate", "--customer", "1", "--customer", "2")
    assert r.exit_code == 0 and r.stdout.startswith("moved 0, already on target 2, unknown 0")
    # no batch id that `dsbc rollback` would call unknown
    assert r.stdout.strip() == (
        "moved 0, already on target 2, unknown 0; no batch (nothing moved); registered on target: 0/0 phones")


def test_several_ids_after_one_customer_option(home: Path) -> None:
    """SPEC 3 writes ``migrate --customer ID ...``: ``--customer 1 2 3`` moves all three
    (it was refused with "unexpected extra arguments")."""
    r = dsbc("migrate", "--customer", "1", "2", "3", "--to", "target")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("moved 3, already on target 0, unknown 0")
    assert [system_of(home, c) for c in ("1", "2", "3", "4")] == ["target"] * 3 + ["source"]
    r = dsbc("migrate", "--customer", "1", "2", "--customer", "4", "--to", "source")
    assert r.exit_code == 0 and r.stdout.startswith("moved 2, already on source 1, unknown 0")
    r = dsbc("migrate", "--batch", "b.txt", "5")
    assert r.exit_code == 2 and "not both" in r.stderr


def test_unknown_ids_are_reported_and_exit_1(home: Path) -> None:
    r = dsbc("migrate", "--customer", "1", "--customer", "nope")
    assert r.exit_code == 1
    assert r.stdout.startswith("moved 1, already on target 0, unknown 1")
    assert r.stderr == "unknown customer(s): nope\n"
    assert system_of(home, "1") == "target"


def test_only_unknown_ids_are_bad_input_exit_2(home: Path) -> None:
    r = dsbc("migrate", "--customer", "nope", "--customer", "nada")
    assert r.exit_code == 2
    assert r.stderr == "unknown customer(s): nope, nada\n"
    assert store_at(home).audit() == []
    r = dsbc("migrate", "--customer", "nope", "--dry-run")
    assert r.exit_code == 2 and r.stderr == "unknown customer(s): nope\n"
    r = dsbc("migrate", "--customer", "1", "--customer", "nope", "--dry-run")
    assert r.exit_code == 1 and system_of(home, "1") == "source"


def test_group_refusal_changes_nothing(home: Path) -> None:
    r = dsbc("migrate", "--customer", "1", "--customer", "g1")
    assert r.exit_code == 2 and r.stderr == "group 'ivr' must move together: missing customer(s) g2, g3\n"
    assert system_of(home, "1") == "source" and system_of(home, "g1") == "source"
    assert store_at(home).audit() == []


def test_dry_run_changes_nothing(home: Path) -> None:
    r = dsbc("migrate", "--customer", "1", "--customer", "2", "--dry-run")
    assert r.exit_code == 0
    assert r.stdout.splitlines() == ["would move 2, already on target 0, unknown 0", "would move: 1, 2"]
    assert system_of(home, "1") == "source"
    r = dsbc("migrate", "--customer", "g1", "--dry-run")
    assert r.exit_code == 2 and "group 'ivr' must move together" in r.stderr


def test_batch_file_in_chunks_and_rollback(home: Path) -> None:
    (home / "batch.txt").write_text("# wave 1\n1\n2\ng1\n3\n\ng2\ng3  # the IVR group\n4\n5\n")
    r = dsbc("migrate", "--batch", "batch.txt", "--batch-size", "2")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("moved 8, already on target 0, unknown 0; batch b-")
    batch_id = r.stdout.split("; ")[1][6:]
    assert {system_of(home, c) for c in ("1", "2", "3", "4", "5", "g1", "g2", "g3")} == {"target"}
    assert system_of(home, "6") == "source"
    assert len(store_at(home).audit(batch_id)) == 8  # one batch id over every chunk
    r = dsbc("rollback", batch_id)
    assert r.exit_code == 0
    assert r.stdout.startswith(f"rolled back {batch_id}: moved 8, already on source 0, unknown 0; batch b-")
    assert system_of(home, "g2") == "source"
    r = dsbc("rollback", "b-nope")
    assert (r.exit_code, r.stderr) == (2, "unknown batch 'b-nope' (dsbc status lists recent batches)\n")


def test_migrate_back_to_source(home: Path) -> None:
    dsbc("migrate", "--customer", "1")
    r = dsbc("migrate", "--customer", "1", "--to", "source")
    assert r.exit_code == 0 and r.stdout.startswith("moved 1, already on source 0")
    assert system_of(home, "1") == "source"


def test_bad_batch_files(home: Path) -> None:
    (home / "b.csv").write_text("name,customer\nx,1\n")
    r = dsbc("migrate", "--batch", "b.csv")
    assert (r.exit_code, r.stderr) == (2, "b.csv:1: a CSV batch file needs a customer_id column\n")
    (home / "empty.txt").write_text("# nothing yet\n")
    assert dsbc("migrate", "--batch", "empty.txt").stderr == "empty.txt: no customer ids\n"
    assert dsbc("migrate", "--batch", "nope.txt").stderr == "nope.txt: no such file\n"
    (home / "sp.txt").write_text("1\n2 3\n")
    assert dsbc("migrate", "--batch", "sp.txt").stderr == "sp.txt:2: '2 3' is not a customer id\n"
    r = dsbc("migrate", "--customer", "1", "--batch", "sp.txt")
    assert r.exit_code == 2 and "give --customer ID (one or more) or --batch FILE, not both" in r.stderr


def test_prepare_caps_expiry_and_the_flip_clears_it(home: Path) -> None:
    s = store_at(home)
    s.record_registrations([Registration("u1", "sip:u1@10.0.0.1", "source", time.time() + 600)])
    r = dsbc("migrate", "--customer", "1", "--customer", "2", "--prepare")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0] == "registration expiry capped at 30 s for 2 customers (already on target 0, unknown 0)"
    assert lines[1].startswith("wait 60") and lines[1].endswith("phones will re-register within 30 s of the flip")
    s.refresh()
    assert s.customer("1").expires_cap == 30 and s.customer("3").expires_cap == 0  # type: ignore[union-attr]
    assert system_of(home, "1") == "source"  # no flip
    dsbc("migrate", "--customer", "1", "--customer", "2")
    s.refresh()
    assert s.customer("1").expires_cap == 0  # type: ignore[union-attr]


def test_unprepare_clears_the_cap_of_a_postponed_batch(home: Path) -> None:
    """Found by an audit: a batch prepared and then postponed kept its phones re-registering
    every sip.migration_expires seconds, and no command cleared the cap."""
    s = store_at(home)
    assert dsbc("migrate", "--customer", "1", "--customer", "2", "--prepare").exit_code == 0
    r = dsbc("migrate", "--customer", "1", "--customer", "2", "--customer", "99", "--unprepare")
    assert r.exit_code == 1  # one unknown id, as for --prepare
    assert r.stdout.splitlines()[0].startswith(
        "registration expiry cap cleared for 2 customers (unknown 1)")
    s.refresh()
    assert s.customer("1").expires_cap == 0 and s.customer("2").expires_cap == 0  # type: ignore[union-attr]
    assert system_of(home, "1") == "source"
    r = dsbc("migrate", "--customer", "1", "--prepare", "--unprepare")
    assert r.exit_code == 2 and "not both" in r.stderr


def test_unprepare_clears_a_cap_prepared_toward_the_source(home: Path) -> None:
    """Found by an audit: a rollback prepared (`--to source --prepare`) and postponed with
    `--unprepare` (no --to) cleared nothing ("cleared for 0 customers (already on target
    1)"): the phones kept re-registering every sip.migration_expires seconds."""
    s = store_at(home)
    assert dsbc("migrate", "--customer", "1").exit_code == 0
    assert dsbc("migrate", "--customer", "1", "--to", "source", "--prepare").exit_code == 0
    s.refresh()
    assert s.customer("1").expires_cap == 30  # type: ignore[union-attr]
    r = dsbc("migrate", "--customer", "1", "--unprepare")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("registration expiry cap cleared for 1 customers (unknown 0)")
    s.refresh()
    assert s.customer("1").expires_cap == 0  # type: ignore[union-attr]
    assert system_of(home, "1") == "target"


def test_registrations_on_target_are_counted(home: Path) -> None:
    s = store_at(home)
    later = time.time() + 600
    s.record_registrations([Registration("u1", "sip:u1@10.0.0.1", "source", later),
                            Registration("u2", "sip:u2@10.0.0.2", "source", later)])
    r = dsbc("migrate", "--customer", "1", "--customer", "2", "--customer", "3")
    assert r.stdout.strip().endswith("registered on target: 0/2 phones")


def _popen_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "dsbc.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_wait_registrations_until_every_phone_is_on_target(home: Path) -> None:
    s = store_at(home)
    later = time.time() + 600
    s.record_registrations([Registration("u1", "sip:u1@10.0.0.1:5060", "source", later),
                            Registration("u2", "sip:u2@10.0.0.2:5060", "source", later)])
    proc = _popen_cli("migrate", "--customer", "1", "--customer", "2", "--wait-registrations", "--timeout", "60")
    try:
        for _ in range(300):  # bounded: until the flip is visible
            s.refresh()
            if s.customer("2").system == "target":  # type: ignore[union-attr]
                break
            time.sleep(0.05)
        # the phones re-register through the SIP workers: u1 from a new port
        s.record_registrations([Registration("u1", "sip:u1@10.0.0.1:6000", "target", later),
                                Registration("u2", "sip:u2@10.0.0.2:5060", "target", later)])
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.splitlines()[-1] == "all 2 phones registered on target"


def test_wait_registrations_says_all_phones_are_there_when_they_already_are(home: Path) -> None:
    """`--wait-registrations` ends with its verdict even when every phone was on the new
    system by the first count (it printed only the summary; the full suite's
    test_wait_registrations_until_every_phone_is_on_target failed on that under load)."""
    s = store_at(home)
    later = time.time() + 600
    s.record_registrations([Registration("u1", "sip:u1@10.0.0.1", "target", later)])
    r = dsbc("migrate", "--customer", "1", "--wait-registrations", "--timeout", "5")
    assert r.exit_code == 0
    assert r.stdout.splitlines()[-2].endswith("registered on target: 1/1 phones")
    assert r.stdout.splitlines()[-1] == "all 1 phones registered on target"


def test_regression_wait_registrations_stops_waiting_for_a_phone_that_is_off(home: Path) -> None:
    """Found by an audit: of two phones prepared with the cap, one was switched off before the
    flip; its binding expired on the source within the cap, yet --wait-registrations kept
    waiting for it until its timeout ("1/2 phones", exit 1), though GAPS.md says such a phone
    counts only until it expires on the source.  The wait ends when every phone still
    registered is on the target, and says how many expired on the way."""
    s = store_at(home)
    now = time.time()
    s.record_registrations([Registration("u1", "sip:u1@10.0.0.1", "source", now + 600),
                            Registration("u1", "sip:u1@10.0.0.9", "source", now + 2.5)])  # off
    proc = _popen_cli("migrate", "--customer", "1", "--wait-registrations", "--timeout", "30")
    try:
        for _ in range(300):  # bounded: until the flip is visible
            s.refresh()
            if s.customer("1").system == "target":  # type: ignore[union-attr]
                break
            time.sleep(0.05)
        s.record_registrations([Registration("u1", "sip:u1@10.0.0.1", "target", now + 600)])
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    assert out.splitlines()[-1] == ("all 1 phones registered on target (1 other phone(s) expired on "
                                    "source without registering again: switched off?)"), out


def test_wait_registrations_times_out(home: Path) -> None:
    store_at(home).record_registrations([Registration("u1", "sip:u1@10.0.0.1", "source", time.time() + 600)])
    r = dsbc("migrate", "--customer", "1", "--wait-registrations", "--timeout", "0.2")
    assert r.exit_code == 1
    assert r.stderr == "timeout after 0.2 s: 0/1 phones registered on target\n"
    assert system_of(home, "1") == "target"


def test_lock_for_holds_the_batch_locked_then_flips(home: Path) -> None:
    s = store_at(home)
    proc = _popen_cli("migrate", "--customer", "1", "--customer", "2", "--lock-for", "1.5")
    try:
        states: set[tuple[str, str]] = set()
        for _ in range(600):  # bounded: 30 s
            s.refresh()
            c = s.customer("1")
            assert c is not None
            states.add((c.system, c.state))
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    s.refresh()
    assert ("source", "locked") in states
    assert (s.customer("1").system, s.customer("1").state) == ("target", "active")  # type: ignore[union-attr]


def _wait_locked(s: SqliteStore, cid: str) -> None:
    """Until a `dsbc migrate --lock-for` running beside the test has locked ``cid``."""
    for _ in range(600):  # bounded: 30 s
        s.refresh()
        if s.customer(cid).state == "locked":  # type: ignore[union-attr]
            return
        time.sleep(0.05)
    pytest.fail("the batch was never locked")


def test_a_second_migration_of_customers_in_a_lock_window_is_refused(home: Path) -> None:
    """Two operators (or a script run twice): the second `dsbc migrate` used to take over
    the customers inside the first one's data-copy window and flip them at once."""
    s = store_at(home)
    proc = _popen_cli("migrate", "--customer", "1", "--customer", "2", "--lock-for", "2")
    try:
        _wait_locked(s, "1")
        first = s.customer("1").batch_id  # type: ignore[union-attr]
        r = dsbc("migrate", "--customer", "1", "--customer", "3")
        assert r.exit_code == 1, r.output
        assert r.stderr.startswith(f"customer(s) 1 locked by batch {first}: a migration in progress")
        s.refresh()
        assert [(s.customer(c).system, s.customer(c).state) for c in "13"] == [  # type: ignore[union-attr]
            ("source", "locked"), ("source", "active")]  # nothing changed, 3 not moved either
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    s.refresh()
    c = s.customer("1")
    assert c is not None and (c.system, c.state, c.batch_id) == ("target", "active", first)


def test_force_takes_over_customers_a_dead_migration_left_locked(home: Path) -> None:
    s = store_at(home)
    s.lock(["1", "2"], "b-dead")  # a `dsbc migrate --lock-for` killed with SIGKILL
    s.migrate(["2"], "target", batch_id="b-other")  # 2 is on the target, still locked
    s.lock(["2"], "b-dead")
    r = dsbc("migrate", "--customer", "1", "--customer", "2")
    assert r.exit_code == 1 and "locked by batch b-dead" in r.stderr and "--force" in r.stderr
    # a dry run says what the run would (found by an audit: "would move 1", exit 0)
    r = dsbc("migrate", "--customer", "1", "--customer", "2", "--dry-run")
    assert r.exit_code == 1 and "locked by batch b-dead" in r.stderr, r.output
    r = dsbc("migrate", "--customer", "1", "--customer", "2", "--dry-run", "--force")
    assert r.exit_code == 0 and "would move: 1" in r.stdout, r.output
    r = dsbc("migrate", "--customer", "1", "--customer", "2", "--force")
    assert r.exit_code == 0, r.output
    s.refresh()
    assert [(s.customer(c).system, s.customer(c).state) for c in "12"] == [  # type: ignore[union-attr]
        ("target", "active"), ("target", "active")]


def test_rollback_of_a_batch_in_its_lock_window_stops_it(home: Path) -> None:
    """Found by an audit: `dsbc rollback` of a batch still in its --lock-for window said
    "rolled back" (or "unknown batch"), and the migration flipped the customers anyway when
    its window ended.  The rollback unlocks them where they are and the migration stops."""
    s = store_at(home)
    proc = _popen_cli("migrate", "--customer", "1", "--customer", "2", "--lock-for", "2")
    try:
        _wait_locked(s, "1")
        batch = s.customer("1").batch_id  # type: ignore[union-attr]
        r = dsbc("rollback", batch)
        assert r.exit_code == 0 and "moved 0, already on source 2" in r.stdout, r.output
        s.refresh()
        assert {(s.customer(c).system, s.customer(c).state) for c in "12"} == {  # type: ignore[union-attr]
            ("source", "active")}
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and err == f"batch {batch} was rolled back while it ran: stopped\n", err
    s.refresh()
    assert {(s.customer(c).system, s.customer(c).state) for c in "12"} == {("source", "active")}  # type: ignore[union-attr]
    assert s.audit(batch) == []


def test_status_names_the_batches_holding_customers_locked(home: Path) -> None:
    """Found by an audit: `dsbc status` counted locked customers but named no batch (one
    that moved nobody is not among the recent batches): nothing said what to roll back."""
    s = store_at(home)
    s.lock(["1", "2"], "b-dead", lease=-1)  # killed with SIGKILL, lease over
    s.lock(["3"], "b-live")
    out = dsbc("status").stdout
    assert ("  locked by batch b-dead: 2 customers (lease ended, its migration stopped: released by a "
            "running node or the next migration; dsbc rollback b-dead releases them now)") in out, out
    assert "  locked by batch b-live: 1 customers (lease ends in " in out, out


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_during_the_lock_window_unlocks(home: Path, signame: str) -> None:
    """A closed ssh session (SIGHUP) or a `timeout`/systemd stop (SIGTERM) during
    --lock-for must not leave the batch locked (its calls would get 503 until someone
    notices): it unlocks like Ctrl-C."""
    import signal

    s = store_at(home)
    proc = _popen_cli("migrate", "--customer", "1", "--customer", "2", "--lock-for", "60")
    try:
        _wait_locked(s, "1")
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip() == "interrupted"
    s.refresh()
    for cid in ("1", "2"):
        c = s.customer(cid)
        assert c is not None
        assert (c.system, c.state) == ("source", "active")


# --- the logic ----------------------------------------------------------------------------


def test_plan_chunks_never_splits_a_group() -> None:
    custs = {c: Customer(c, group="g" if c.startswith("g") else "") for c in ["1", "g1", "2", "g2", "3", "g3", "4"]}
    chunks = plan_chunks(["1", "g1", "2", "g2", "3", "g3", "4"], custs, 2)
    assert chunks == [["1"], ["g1", "g2", "g3"], ["2", "3"], ["4"]]
    assert plan_chunks(["1", "2", "3"], custs, 500) == [["1", "2", "3"]]


class FailingStore(SqliteStore):
    """Fails the n-th flip, as a full disk would."""

    fail_on = 2

    def migrate(self, customer_ids, to, who="cli", batch_id=None, dry_run=False):  # type: ignore[no-untyped-def]
        if not dry_run:
            self.fail_on -= 1
            if self.fail_on == 0:
                raise StoreError("disk full")
        return super().migrate(customer_ids, to, who, batch_id, dry_run)


def test_failure_midway_unlocks_what_was_not_flipped(home: Path) -> None:
    s = FailingStore(str(home / "loc.db"))
    with pytest.raises(StoreError, match="disk full"):
        move_batch(s, ["1", "2", "3", "4"], "target", batch_size=2, lock_for=0.01, sleep=lambda _: None)
    got = {c: (x.system, x.state) for c, x in s.customers(["1", "2", "3", "4"]).items()}
    assert got == {"1": ("target", "active"), "2": ("target", "active"),
                   "3": ("source", "active"), "4": ("source", "active")}


class GoneStore(SqliteStore):
    """The store goes away during the lock window: the flip fails, and so do the first
    ``unlock_failures`` unlocks (a Redis restarting under its supervisor)."""

    unlock_failures = 0

    def migrate(self, customer_ids, to, who="cli", batch_id=None, dry_run=False):  # type: ignore[no-untyped-def]
        if not dry_run:
            raise StoreUnavailable("migrating failed: cannot reach redis://x (refused); nothing was changed")
        return super().migrate(customer_ids, to, who, batch_id, dry_run)

    def unlock(self, customer_ids, batch_id=None):  # type: ignore[no-untyped-def]
        if self.unlock_failures:
            self.unlock_failures -= 1
            raise StoreUnavailable("unlocking failed: cannot reach redis://x")
        return super().unlock(customer_ids, batch_id)


@pytest.mark.parametrize("failures", [3, 100])
def test_a_store_lost_in_the_lock_window_unlocks_when_it_is_back_or_says_who_stays_locked(
        home: Path, failures: int) -> None:
    """Found by an audit: Redis killed during `--lock-for`, `dsbc migrate` said "nothing was
    changed" and the customers stayed locked (every call 503) with no word of it."""
    s = GoneStore(str(home / "loc.db"))
    s.unlock_failures = failures
    pauses: list[float] = []
    with pytest.raises(StoreUnavailable) as err:
        move_batch(s, ["1", "2"], "target", lock_for=1, sleep=pauses.append)
    states = {c.state for c in s.customers(["1", "2"]).values()}
    if failures == 3:  # back within the retries: unlocked, and the store's own error stands
        assert states == {"active"} and pauses == [1, 0.5, 1.0, 2.0]
        assert str(err.value).endswith("; nothing was changed")
    else:
        assert states == {"locked"} and sum(pauses) == 1 + 15.5
        assert str(err.value) == (
            "migrating failed: cannot reach redis://x (refused); customer(s) 1, 2 stay locked on "
            "source (the store could not be reached to unlock them) until the batch's lease "
            "(store.lock_lease, 30 s) runs out: dsbc migrate --force --to source --customer ID ... "
            "unlocks them where they are now")
        s.unlock_failures = 0
        assert dsbc("migrate", "--force", "--to", "source", "--customer", "1", "--customer", "2").exit_code == 0
        s.refresh()  # what the command did, in this store's index
        assert {(c.system, c.state) for c in s.customers(["1", "2"]).values()} == {("source", "active")}


def test_interrupt_during_the_lock_window_unlocks(home: Path) -> None:
    s = store_at(home)

    def interrupted(_: float) -> None:
        assert {c.state for c in s.customers(["1", "2"]).values()} == {"locked"}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        move_batch(s, ["1", "2"], "target", lock_for=60, sleep=interrupted)
    assert {(c.system, c.state) for c in s.customers(["1", "2"]).values()} == {("source", "active")}


def test_move_batch_refuses_a_split_group_before_locking(home: Path) -> None:
    s = store_at(home)
    with pytest.raises(GroupSplitError):
        move_batch(s, ["1", "g1"], "target")
    assert s.counts()["customers.source.locked"] == 0


@pytest.mark.parametrize("lock_for", [0.0, 5.0])
def test_an_interrupt_just_after_a_lock_committed_still_unlocks(home: Path, lock_for: float) -> None:
    """Found by the full suite under load (SIGHUP during --lock-for): a signal that arrived
    after the store had committed a chunk's lock but before move_batch noted it left those
    customers locked (their calls held, then 503) although the command said "interrupted"
    and unlocked what it knew of."""
    s = store_at(home)

    class InterruptedAfterLock:
        def __init__(self, store: SqliteStore) -> None:
            self.store = store

        def __getattr__(self, name: str) -> object:
            return getattr(self.store, name)

        def lock(self, ids: list[str], batch_id: str, force: bool = False, lease: float = 30.0) -> None:
            self.store.lock(ids, batch_id, force, lease)
            raise KeyboardInterrupt  # the signal, right after the commit

    with pytest.raises(KeyboardInterrupt):
        move_batch(InterruptedAfterLock(s), ["1", "2"], "target", lock_for=lock_for,  # type: ignore[arg-type]
                   sleep=lambda _: None)
    s.refresh()
    for cid in ("1", "2"):
        c = s.customer(cid)
        assert c is not None and (c.system, c.state) == ("source", "active")


def test_registration_counts_by_account(home: Path) -> None:
    s = store_at(home)
    later = time.time() + 600
    s.record_registrations([Registration("u1", "c1", "source", later), Registration("u1", "c2", "source", later),
                            Registration("u2", "c3", "source", later)])
    expected = phones_by_account(s, ["1", "2"])
    assert expected == {"u1": 2, "u2": 1}
    s.record_registrations([Registration("u1", "c9", "target", later)])
    assert phones_on(s, ["1", "2"], "target", expected) == 1
    ticks = iter(range(100))
    seen: list[int] = []
    done = wait_registrations(s, ["1", "2"], "target", expected, timeout=3, progress=seen.append,
                              clock=lambda: float(next(ticks)), sleep=lambda _: None)
    assert done == (1, 3) and len(seen) >= 2 and set(seen) == {1}  # polled until the deadline


def test_wait_registrations_rides_out_a_store_outage(home: Path) -> None:
    """Found by an audit: `dsbc migrate --wait-registrations` on Redis stopped with
    "reading registrations failed: cannot reach ..." (exit 1) at the first poll that found
    Redis restarting, after the batch had moved, while the phones were re-registering (the
    nodes keep their registrations and write them when Redis is back).  It waits on until
    its timeout; a store still away then says why."""
    s = store_at(home)
    later = time.time() + 600
    s.record_registrations([Registration("u1", "c1", "source", later)])
    expected = phones_by_account(s, ["1"])
    polls = iter(["down", "down", "up"])

    class Flaky:
        def registrations(self, ids: list[str], now: float | None = None) -> list[Registration]:
            if next(polls, "up") == "down":
                raise StoreUnavailable("reading registrations failed: cannot reach redis://x")
            return [Registration("u1", "c9", "target", later)]

    ticks = iter(range(100))
    done = wait_registrations(Flaky(), ["1"], "target", expected, timeout=10,  # type: ignore[arg-type]
                              clock=lambda: float(next(ticks)), sleep=lambda _: None)
    assert done.on == 1
    polls = iter(["down"] * 100)
    ticks = iter(range(100))
    with pytest.raises(StoreUnavailable, match="cannot reach"):
        wait_registrations(Flaky(), ["1"], "target", expected, timeout=3,  # type: ignore[arg-type]
                           clock=lambda: float(next(ticks)), sleep=lambda _: None)


def test_migrate_reports_its_batch_when_the_phone_count_fails(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an audit: a store that stopped answering right after the flip made `dsbc
    migrate` end on "reading registrations failed" without its summary or batch id (the
    batch had moved); one away before the flip did not say nothing was changed."""
    def away(*_: object) -> int:
        raise StoreUnavailable("reading registrations failed: cannot reach redis://x")

    monkeypatch.setattr(cli, "phones_on", away)
    r = CliRunner().invoke(cli.main, ["migrate", "--customer", "1"])
    assert r.exit_code == 0, r.output
    assert "moved 1, already on target 0, unknown 0; batch b-" in r.output
    assert "cannot count the registered phones: reading registrations failed" in r.output
    monkeypatch.setattr(cli, "phones_by_account", away)
    r = CliRunner().invoke(cli.main, ["migrate", "--customer", "2"])
    assert r.exit_code == 1
    assert "migration refused: reading registrations failed" in r.output and "nothing was changed" in r.output
    s = store_at(home)
    assert s.customer("1").system == "target" and s.customer("2").system == "source"  # type: ignore[union-attr]


def test_read_batch_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("1\n2\n1\n")
    assert read_batch(str(tmp_path / "a.txt")) == ["1", "2"]
    (tmp_path / "b.csv").write_text("customer_id,name\n7,x\n8,y\n")
    assert read_batch(str(tmp_path / "b.csv")) == ["7", "8"]
    (tmp_path / "c.csv").write_text("i_customer\n9\n")
    assert read_batch(str(tmp_path / "c.csv")) == ["9"]
    with pytest.raises(InputError, match="no customer_id field"):
        (tmp_path / "d.csv").write_text("name,customer_id\nx\n")
        read_batch(str(tmp_path / "d.csv"))
    # the import file itself (JSON lines or an array) names the batch: was read as ids
    # '{"customer_id":"100"}' and every one reported unknown
    (tmp_path / "e.jsonl").write_text('{"customer_id": "100", "identities": ["account:a"]}\n{"customer_id": 101}\n')
    assert read_batch(str(tmp_path / "e.jsonl")) == ["100", "101"]
    (tmp_path / "f.json").write_text('[\n {"customer_id": "7"}\n]\n')
    assert read_batch(str(tmp_path / "f.json")) == ["7"]
    (tmp_path / "g.jsonl").write_text('{"id": "7"}\n')
    with pytest.raises(InputError, match=r"g.jsonl:1: expected an object with a customer_id"):
        read_batch(str(tmp_path / "g.jsonl"))


def test_progress_bar() -> None:
    out = io.StringIO()
    bar = Progress(4, "migrate", out, enabled=True, width=8)
    bar(1)
    bar(4)
    bar.close()
    assert out.getvalue() == "\rmigrate [##......] 1/4\rmigrate [########] 4/4\n"
    quiet = io.StringIO()
    Progress(4, "x", quiet, enabled=False)(2)
    assert quiet.getvalue() == ""


def test_failure_after_a_flipped_chunk_says_how_to_undo(home: Path) -> None:
    s = FailingStore(str(home / "loc.db"))
    with pytest.raises(BatchAborted) as err:
        move_batch(s, ["1", "2", "3"], "target", batch_size=1, who="alice")
    bid = err.value.result.batch_id
    assert err.value.result.moved == ["1"]
    assert str(err.value) == (
        f"disk full; 1 customer(s) had already moved to target in batch {bid} "
        f"(dsbc rollback {bid} moves them back; dsbc migrate again finishes the batch)")
    assert {c: x.state for c, x in s.customers(["1", "2", "3"]).items()} == {
        "1": "active", "2": "active", "3": "active"}
    s.rollback(bid)
    assert s.customer("1").system == "source"  # type: ignore[union-attr]


def test_interrupt_between_chunks(home: Path) -> None:
    s = store_at(home)
    calls: list[int] = []

    def progress(done: int) -> None:
        calls.append(done)
        raise KeyboardInterrupt

    with pytest.raises(BatchAborted, match="^interrupted; 1 customer.s. had already moved"):
        move_batch(s, ["1", "2"], "target", batch_size=1, progress=progress)
    assert system_of(home, "2") == "source" and calls == [1]


def test_import_does_not_move_a_stored_customer_to_another_system(home: Path) -> None:
    """An import is no migration (no audit entry, no group check): a row naming another
    system for a stored customer refuses the whole file, pointing to `dsbc migrate`."""
    assert dsbc("migrate", "--customer", "1").exit_code == 0
    (home / "again.csv").write_text(
        "customer_id,identities,system\n2,account:u2,source\n1,account:u1;did:5550101,source\n")
    r = dsbc("import", "again.csv")
    assert r.exit_code == 2
    assert r.stderr.strip() == (
        "again.csv:3: customer 1 is on target, not source: move it with `dsbc migrate "
        "--customer 1 --to source` (audited, groups checked), or leave system out to keep it "
        "where it is; nothing was imported")
    assert system_of(home, "1") == "target" and store_at(home).lookup("did", "5550101") is None
    (home / "again.csv").write_text("customer_id,identities\n1,account:u1;did:5550101\n")
    assert dsbc("import", "again.csv").exit_code == 0
    assert system_of(home, "1") == "target" and store_at(home).lookup("did", "5550101") is not None


def test_audit_shows_who_moved_whom_when_by_batch_and_by_customer(home: Path) -> None:
    """SPEC 1: migrations are recorded in an audit log (who, when, from, to, batch id);
    found by an audit: written, but only batch summaries could be read."""
    import json

    first = dsbc("migrate", "--customer", "1", "--customer", "2", "--who", "alice").stdout
    bid = first.split("batch ")[1].split()[0].rstrip(";")
    assert dsbc("rollback", bid, "--who", "bob").exit_code == 0
    r = dsbc("audit", "--batch", bid)
    lines = r.stdout.splitlines()
    assert r.exit_code == 0 and len(lines) == 2, r.output
    assert all(f"  {bid}  alice  customer " in ln and ln.endswith("source -> target") for ln in lines)
    r = dsbc("audit", "--customer", "1", "--json")
    moves = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [(m["who"], m["from"], m["to"]) for m in moves] == [("alice", "source", "target"),
                                                                ("bob", "target", "source")]
    assert moves[1]["note"] == f"rollback of {bid}" and moves[0]["batch_id"] == bid
    assert len(dsbc("audit").stdout.splitlines()) == 4 and len(dsbc("audit", "--limit", "1").stdout.splitlines()) == 1
    r = dsbc("audit", "--batch", "b-nope")
    assert r.exit_code == 1 and r.stderr.strip() == "no audit entries for batch b-nope"
    r = dsbc("audit", "--customer", "3")
    assert r.exit_code == 1 and r.stderr.strip() == "no audit entries for customer 3"
    # found by an audit: a traceback (OverflowError from SQLite), and "no audit entries for
    # the store" for a batch id that is empty
    r = dsbc("audit", "--limit", "99999999999999999999999")
    assert r.exit_code == 2 and "Invalid value for '--limit'" in r.stderr, r.output
    r = dsbc("audit", "--batch", " ")
    assert r.exit_code == 2 and "'' is not a batch id" in r.stderr, r.output
    # --help says --limit is "not with --batch": it was taken and ignored (every entry shown)
    r = dsbc("audit", "--batch", bid, "--limit", "1")
    assert r.exit_code == 2 and "--limit does not go with --batch" in r.stderr and not r.stdout, r.output


def test_seconds_that_are_not_finite_are_bad_usage(home: Path) -> None:
    """Found by an audit: `--lock-for inf` (or 1e300) ended in a traceback from time.sleep
    (OverflowError) and `--lock-for nan` did not wait at all; the control API takes 0-600."""
    cases = [("--lock-for", "inf"), ("--lock-for", "nan"), ("--lock-for", "1e300"), ("--lock-for", "601"),
             ("--timeout", "inf"), ("--timeout", "nan")]
    for opt, value in cases:
        extra = ["--wait-registrations"] if opt == "--timeout" else []
        r = dsbc("migrate", "--customer", "1", opt, value, *extra)
        assert r.exit_code == 2 and f"Invalid value for '{opt}'" in r.stderr, (opt, value, r.output)
        assert "\n" not in r.stderr.strip()
    assert system_of(home, "1") == "source"
    r = dsbc("migrate", "--customer", "1", "--timeout", "30")  # without --wait-registrations: ignored
    assert r.exit_code == 2 and "--timeout goes with --wait-registrations" in r.stderr, r.output
    assert system_of(home, "1") == "source"
