"""`dsbc import`, `where`, `status`, config handling, usage errors, plugins."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from dsbc import cli
from dsbc.store import open_store

CSV = """customer_id,identities,system,group
1,account:alice;did:+1 555 0100,,
2,account:bob;did:15550101,target,
3,account:carol,,ivr
4,account:dave;cpe:00:11:22:33:44:55,,ivr
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with ./dsbc.toml and a store file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DSBC_CONFIG", raising=False)
    (tmp_path / "dsbc.toml").write_text(
        f'[store]\nurl = "sqlite:///{tmp_path}/loc.db"\n\n'
        '[systems.source]\nname = "MR100"\n\n[systems.target]\nname = "MR115"\n\n'
        '[control]\nlisten = "127.0.0.1:9"\n'
    )
    (tmp_path / "customers.csv").write_text(CSV)
    return tmp_path


def dsbc(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.main, list(args), env=env, catch_exceptions=False)


def one_line_error(r: Result, code: int = 2) -> str:
    assert r.exit_code == code, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


# --- import -------------------------------------------------------------------------------


def test_import_csv_then_where(home: Path) -> None:
    r = dsbc("import", "customers.csv")
    assert r.exit_code == 0 and r.stdout == "imported 4 customers, 7 identities\n"
    r = dsbc("where", "did:+1 (555) 0100")
    assert r.exit_code == 0
    assert r.stdout.splitlines() == [
        "identity: did:15550100", "customer: 1", "system:   source (MR100)", "state:    active"]
    r = dsbc("where", "cpe:00-11-22-33-44-55")
    assert "customer: 4" in r.stdout and "group:    ivr" in r.stdout
    assert "system:   target (MR115)" in dsbc("where", "account:bob").stdout


def test_import_reads_standard_input_for_a_dash(home: Path) -> None:
    """`... | dsbc import -`, as most tools read "-" (found by an audit: it looked for a
    file named "-").  The format comes from the first character, as for a file without
    an extension."""
    proc = subprocess.run([sys.executable, "-m", "dsbc.cli", "import", "-"], input=CSV, text=True,
                          capture_output=True, cwd=home, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout == "imported 4 customers, 7 identities\n", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dsbc.cli", "import", "-"], text=True,
                          input='{"customer_id": "20"}\n',
                          capture_output=True, cwd=home, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("-:1: missing field"), proc.stderr


def test_import_jsonl_and_json_array(home: Path) -> None:
    (home / "c.jsonl").write_text(
        '{"customer_id": "10", "identities": ["account:x", "did:100"], "system": "target"}\n'
        "\n"
        '{"customer_id": 11, "identities": "account:y", "group": "g"}\n'
    )
    assert dsbc("import", "c.jsonl").stdout == "imported 2 customers, 3 identities\n"
    (home / "c.json").write_text('[\n  {"customer_id": "12", "identities": ["account:z"]},\n'
                                 '  {"customer_id": "13", "identities": []}\n]\n')
    assert dsbc("import", "c.json").stdout == "imported 2 customers, 1 identities\n"
    (home / "noext").write_text('{"customer_id": "14", "identities": ["account:w"]}\n')
    assert dsbc("import", "noext").exit_code == 0
    s = open_store(f"sqlite:///{home}/loc.db")
    assert s.lookup("did", "100").system == "target"  # type: ignore[union-attr]
    assert s.customer("11").group == "g"  # type: ignore[union-attr]
    assert s.lookup("account", "w") is not None


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("customers.csv", "customer_id,identities\n" + "".join(f"{i},account:u{i}\n" for i in range(1, 13))
         + "13,did:12ab\n", "customers.csv:14: did:'12ab' is not a number"),
        ("customers.csv", "customer_id,identity_list\n1,account:a\n",
         "customers.csv:1: unknown column 'identity_list' (expected customer_id, identities, system, group)"),
        ("customers.csv", "customer_id,system\n1,source\n",
         "customers.csv:1: the header has no 'identities' column (expected customer_id, identities, system, group)"),
        ("customers.csv", "customer_id,identities\n1,account:a\n\n1,account:b\n",
         "customers.csv:4: customer 1 is already on line 2"),
        ("customers.csv", "customer_id,identities\n1,account:a\n2,did:1;account:a\n",
         "customers.csv:3: account:a already belongs to customer 1 (line 2)"),
        ("customers.csv", "customer_id,identities\n1,account:a,extra\n",
         "customers.csv:2: 3 fields, the header has 2"),
        # a quote left open: the row where it opens, not the end of the file (found by an audit)
        ("customers.csv", 'customer_id,identities\n1,"account:a\n2,account:b\n3,account:c\n',
         "customers.csv:2: a quote opened here is never closed"),
        ("customers.csv", 'customer_id,identities\n1,account:a\n2,"account:b"x\n',
         "customers.csv:3: ',' expected after '\"'"),
        ("customers.csv", 'customer_id,identities\n1,"account:a;\ndid:1"\n2,did:x\n',
         "customers.csv:4: did:'x' is not a number"),
        ("customers.csv", "customer_id,identities,system\n1,account:a,sideways\n",
         "customers.csv:2: system: 'sideways' is not source or target"),
        ("customers.csv", "customer_id,identities\n1,phone:123\n",
         "customers.csv:2: unknown identity kind 'phone' (one of account, i_account, did, login, cpe, imsi, msisdn, radius, i_did_number)"),
        ("customers.csv", "customer_id,identities\n,account:a\n",
         "customers.csv:2: customer_id: '' is not a customer id"),
        ("customers.csv", "customer_id,identities\n1,account:a\n2,account:10\x1b[0m\n",
         "customers.csv:3: account:'10\\x1b[0m' has a control character"),
        ("customers.csv", "customer_id,identities\n7\x7f,account:a\n",
         "customers.csv:2: customer_id: '7\\x7f' is not a customer id (no spaces or control characters, at most 128 characters)"),
        ("customers.csv", "", "customers.csv: no customers in the file (expected a header (customer_id, identities, system, group) and rows)"),
        ("customers.csv", "customer_id,identities\n", "customers.csv: no customers in the file (expected a header (customer_id, identities, system, group) and rows)"),
        ("customers.jsonl", "\n# nothing yet\n", "customers.jsonl: no customers in the file (expected one JSON object per line)"),
        ("customers.json", "[]", "customers.json: no customers in the file (expected an array of objects)"),
        ("customers.csv", "customer_id,customer_id,identities\n1,2,account:a\n", "customers.csv:1: column 'customer_id' twice"),
        ("customers.csv", 'customer_id,identities\n1,"account:a8,did:18"\n',
         "customers.csv:2: account:'a8,did:18' looks like several identities: separate them with ';'"),
        ("customers.csv", "customer_id,identities\n1,account:a9 did:19\n",
         "customers.csv:2: account:'a9 did:19' looks like several identities: separate them with ';'"),
        ("customers.csv", "customer_id,identities\n1,account:a 9\n",
         "customers.csv:2: account:'a 9' has a space (a SIP user has none; identities are separated by ';')"),
        ("customers.jsonl", '{"customer_id": "1", "identities": ["account:\\ud800"]}\n',
         "customers.jsonl:1: account:'\\ud800' has a lone surrogate (not text)"),
        ("customers.jsonl", "[" * 100_000 + "\n", "customers.jsonl:1: not usable JSON: nested too deeply"),
        ("customers.jsonl", '{"customer_id": "1", "system": "source"}\n',
         "customers.jsonl:1: missing field 'identities' (a list of KIND:VALUE, or [] for none)"),
        ("customers.jsonl", '{"customer_id": ' + "9" * 5000 + "}\n",
         "customers.jsonl:1: not usable JSON: a number with more than 4,300 digits"),
        ("c.jsonl", '{"customer_id": "1", "identities": ["account:a"]}\n{"customer_id": "2", "identities": [\n',
         "c.jsonl:2: not JSON: Expecting value"),
        ("c.jsonl", '["1", "account:a"]\n', "c.jsonl:1: expected an object with customer_id and identities"),
        ("c.jsonl", '{"customer_id": "1", "identities": ["cpe:xyz"]}\n',
         "c.jsonl:1: cpe:'xyz' is not a MAC address (12 hex digits)"),
        ("c.json", '[\n {"customer_id": "1", "identities": []},\n {"customer_id": "2", "bogus": 1}\n]',
         "c.json:3: unknown field(s) bogus (expected customer_id, identities, system, group)"),
    ],
)
def test_import_errors_name_file_and_line(home: Path, name: str, text: str, message: str) -> None:
    (home / name).write_text(text)
    assert one_line_error(dsbc("import", name)) == message
    assert open_store(f"sqlite:///{home}/loc.db").counts()["customers"] == 0  # nothing half-imported


def test_import_missing_file(home: Path) -> None:
    assert one_line_error(dsbc("import", "nope.csv")) == "nope.csv: no such file"
    (home / "latin1.csv").write_bytes(b"customer_id,identities\n1,account:caf\xe9\n")
    assert one_line_error(dsbc("import", "latin1.csv")) == "latin1.csv:2: not UTF-8 text"


# --- where --------------------------------------------------------------------------------


def test_where_unknown_follows_the_policy(home: Path) -> None:
    dsbc("import", "customers.csv")
    r = dsbc("where", "did:999")
    assert r.exit_code == 1 and r.stdout == "did:999: unknown: would go to source (MR100) (store.unknown)\n"
    cfg = home / "dsbc.toml"
    cfg.write_text(cfg.read_text().replace("[store]\n", '[store]\nunknown = "reject"\n'))
    r = dsbc("where", "account:nobody")
    assert r.exit_code == 1 and r.stdout == "account:nobody: unknown: would be rejected (store.unknown)\n"


@pytest.mark.parametrize(("arg", "message"), [
    ("did:12ab", "did:'12ab' is not a number"),
    ("alice", "'alice' is not KIND:VALUE"),
    ("foo:1", "unknown identity kind 'foo' (one of account, i_account, did, login, cpe, imsi, msisdn, radius, i_did_number)"),
])
def test_where_bad_identity(home: Path, arg: str, message: str) -> None:
    assert one_line_error(dsbc("where", arg)) == message


# --- config, usage ------------------------------------------------------------------------


def test_config_file_resolution(home: Path) -> None:
    dsbc("import", "customers.csv")
    os.rename(home / "dsbc.toml", home / "other.toml")
    assert one_line_error(dsbc("where", "account:bob")) == "dsbc.toml: no such file (give -c FILE or --store URL)"
    assert dsbc("where", "account:bob", "-c", "other.toml").exit_code == 0
    assert dsbc("-c", "other.toml", "where", "account:bob").exit_code == 0
    assert dsbc("where", "account:bob", env={"DSBC_CONFIG": "other.toml"}).exit_code == 0
    r = dsbc("where", "account:bob", "--store", f"sqlite:///{home}/loc.db")
    assert r.exit_code == 0 and "system:   target\n" in r.stdout  # no config: no system names
    assert one_line_error(dsbc("where", "account:bob", "-c", "missing.toml", "--store", "sqlite:///x.db")) == (
        "missing.toml: no such file (give -c FILE or --store URL)")
    # commands that need more than the store want the config file
    assert one_line_error(dsbc("migrate", "--customer", "1", "--prepare", "--store", f"sqlite:///{home}/loc.db")) == (
        "dsbc.toml: no such file (give -c FILE)")


def test_bad_config_is_one_line(home: Path) -> None:
    (home / "dsbc.toml").write_text('[store]\nurl = "sqlite:///x.db"\n\n[sip]\nworkers = 0\n')
    assert one_line_error(dsbc("where", "account:a")) == "dsbc.toml:5: sip.workers: must be between 1 and 256"


def test_bad_store_url(home: Path) -> None:
    assert one_line_error(dsbc("where", "account:a", "--store", "redis://127.0.0.1:1/0"), 1).startswith(
        "opening the store failed: cannot reach redis://127.0.0.1:1/0")
    r = dsbc("where", "account:a", "--store", f"sqlite:///{home}/no/such/dir/loc.db")
    assert "does not exist" in one_line_error(r)


def test_a_store_directory_that_is_not_there_says_how_to_make_it(home: Path) -> None:
    """The README's example config names /var/lib/dsbc/location.db: on a new host the
    first `dsbc import` or `dsbc run --check` found no such directory, and said only that."""
    where = home / "var" / "lib" / "dsbc"
    (home / "dsbc.toml").write_text(f'[store]\nurl = "sqlite:///{where}/location.db"\n')
    for args in (("import", "customers.csv"), ("run", "--check")):
        line = one_line_error(dsbc(*args))
        assert f"directory {where} does not exist" in line, line
        assert f"install -d -o dsbc -g dsbc {where}" in line and "store.url" in line, line


def test_only_import_creates_a_store(home: Path) -> None:
    msg = f"no store at {home}/loc.db (dsbc import creates it)"
    assert one_line_error(dsbc("where", "account:a")) == msg
    assert one_line_error(dsbc("migrate", "--customer", "1")) == msg
    assert one_line_error(dsbc("rollback", "b-x")) == msg
    r = dsbc("status")
    assert r.exit_code == 2 and f"  error: {msg}" in r.stdout.splitlines()  # bad input, as above
    r = dsbc("status", "--store", "redis://127.0.0.1:1/0")  # a store that cannot be reached: 1
    assert r.exit_code == 1 and "  error: opening the store failed: cannot reach redis://127.0.0.1:1/0" in r.stdout
    assert not (home / "loc.db").exists()
    assert dsbc("import", "customers.csv").exit_code == 0


@pytest.mark.parametrize(("url", "message"), [
    # found by an audit: a traceback (ValueError), a line of 1,100 characters of redis-py's
    # object dump, and an import into a temporary database that said it imported
    ("redis://127.0.0.1:99999/0", "bad store url 'redis://127.0.0.1:99999/0': Port out of range 0-65535"),
    ("redis+sentinel://127.0.0.1:1/svc",
     "opening the store failed: cannot reach redis+sentinel://127.0.0.1:1/svc (No master found for 'svc')"),
    ("sqlite:///", "'sqlite:///' names no file (sqlite:///path/location.db)"),
    ("sqlite:///:memory:", ("store sqlite:///:memory:: a store in memory keeps nothing past this command "
                            "(give a file: sqlite:///path/location.db)")),
])
def test_a_store_url_that_cannot_be_used_is_one_line(home: Path, url: str, message: str) -> None:
    code = 1 if "cannot reach" in message else 2
    for args in (["import", "customers.csv"], ["where", "account:a"]):
        assert one_line_error(dsbc("--store", url, *args), code) == message


@pytest.mark.parametrize(("args", "message"), [
    (["frob"], "dsbc: No such command 'frob'. (see dsbc --help)"),
    (["migrate", "--bogus"], "dsbc migrate: No such option '--bogus'. (see dsbc migrate --help)"),
    (["migrate"], "dsbc migrate: give --customer ID (one or more) or --batch FILE (see dsbc migrate --help)"),
    (["migrate", "--customer", "1", "--to", "middle"],
     "dsbc migrate: Invalid value for '--to': 'middle' is not one of 'target', 'source'. (see dsbc migrate --help)"),
    (["import"], "dsbc import: Missing argument 'FILE'. (see dsbc import --help)"),
    (["migrate", "--customer", "1", "--batch-size", "0"],
     "dsbc migrate: Invalid value for '--batch-size': 0 is not in the range x>=1. (see dsbc migrate --help)"),
    # was accepted and ignored: the node ran on the config's store, not the one given
    (["run", "--check", "--store", "sqlite:///elsewhere.db"],
     ("dsbc run: --store is not used by run: the node takes store.url from the config (a reload "
      "reads the file again); write it there (see dsbc run --help)")),
    (["--store", "sqlite:///elsewhere.db", "run", "--check"],
     ("dsbc run: --store is not used by run: the node takes store.url from the config (a reload "
      "reads the file again); write it there (see dsbc run --help)")),
])
def test_usage_errors_are_one_line(home: Path, args: list[str], message: str) -> None:
    assert one_line_error(dsbc(*args)) == message


def test_help_and_no_arguments(home: Path) -> None:
    r = dsbc()
    assert r.exit_code == 0 and "Commands:" in r.stdout and "migrate" in r.stdout
    assert dsbc("migrate", "--help").exit_code == 0


# --- status -------------------------------------------------------------------------------


def test_status_without_a_node(home: Path) -> None:
    dsbc("import", "customers.csv")
    dsbc("migrate", "--customer", "1", "--who", "alice")
    r = dsbc("status")
    assert r.exit_code == 0
    out = r.stdout.splitlines()
    assert out[0].startswith("no running node reachable at http://127.0.0.1:9 (")
    assert "  source (MR100): 2 active, 0 locked" in out
    assert "  target (MR115): 2 active, 0 locked" in out
    assert any("alice  source -> target  1 customers" in line for line in out)
    data = json.loads(dsbc("status", "--json").stdout)
    assert data["store"]["counts"]["identities"] == 7 and data["node"]["reachable"] is False
    # a node asked for by name that does not answer: exit 1 (was 0), the store still shown
    r = dsbc("status", "--node", "http://127.0.0.1:9")
    assert r.exit_code == 1 and "  source (MR100): 2 active, 0 locked" in r.stdout.splitlines()


def test_collect_status_queries_the_control_api(home: Path) -> None:
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(f"{self.path} {self.headers.get('Authorization')}")
            body = json.dumps({"node": {"workers": 2, "sip_workers": 2}, "uptime": 5, "pid": 42,
                               "store": {"healthy": True}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = home / "dsbc.toml"
        cfg.write_text(cfg.read_text().replace('listen = "127.0.0.1:9"',
                                               f'listen = "127.0.0.1:{server.server_port}"\ntoken = "s3cret"'))
        r = dsbc("status")
    finally:
        server.shutdown()
    assert seen == ["/v1/status Bearer s3cret"]
    assert r.stdout.splitlines()[:3] == [f"node http://127.0.0.1:{server.server_port} (pid 42):",
                                         "  workers: 2 (2 SIP), up 5 s", "  store: healthy"]


# --- plugins ------------------------------------------------------------------------------


def test_plugins_load_only_when_present(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "dsbc_fake_plugin.py").write_text(
        "import click\n@click.command('fake')\ndef fake_command():\n    click.echo('fake ran')\n")
    (tmp_path / "dsbc_broken_plugin.py").write_text("import dsbc_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    group = cli.DsbcGroup(commands={})
    monkeypatch.setattr(cli.DsbcGroup, "_plugins_loaded", False)
    monkeypatch.setattr(cli, "_PLUGINS", ["dsbc_missing_module:x", "dsbc_fake_plugin:fake_command"])
    assert group.list_commands(None) == ["fake"]  # type: ignore[arg-type]
    monkeypatch.setattr(cli.DsbcGroup, "_plugins_loaded", False)
    monkeypatch.setattr(cli, "_PLUGINS", ["dsbc_broken_plugin:x"])
    with pytest.raises(ModuleNotFoundError, match="dsbc_no_such_dependency"):
        cli.DsbcGroup(commands={}).list_commands(None)  # type: ignore[arg-type]


def test_where_does_not_import_plugins(home: Path) -> None:
    code = ("import sys\nfrom dsbc.cli import main\n"
            "try:\n    main(['where', 'account:x'])\nexcept SystemExit:\n    pass\n"
            "print('dsbc.runner' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout.strip().splitlines()[-1] == "False"


# --- as a real process --------------------------------------------------------------------


def test_end_to_end_subprocess(home: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dsbc.cli", *args], capture_output=True,
                              text=True, timeout=60, check=False)

    r = run("import", "customers.csv")
    assert (r.returncode, r.stdout) == (0, "imported 4 customers, 7 identities\n")
    r = run("migrate", "--customer", "1")
    assert r.returncode == 0 and r.stdout.startswith("moved 1, already on target 0, unknown 0; batch b-")
    r = run("where", "did:15550100")
    assert "system:   target (MR115)" in r.stdout
    (home / "bad.csv").write_text("customer_id,identities\n9,did:12ab\n")
    r = run("import", "bad.csv")
    assert (r.returncode, r.stderr) == (2, "bad.csv:2: did:'12ab' is not a number\n")
    r = subprocess.run(["dsbc", "where", "account:nobody"], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 1 and "unknown: would go to source (MR100)" in r.stdout


def test_demo_refuses_a_config_it_would_not_use(home: Path) -> None:
    """`dsbc -c my.toml demo` would start the demo's own config, not the operator's: said
    at once (exit 2) rather than ignored."""
    for args in (["-c", "dsbc.toml", "demo"], ["demo", "-c", "dsbc.toml"]):  # after it: was "no such option"
        assert one_line_error(dsbc(*args, "--duration", "0")) == (
            "dsbc demo: the demo writes its own config and store (in --dir): -c/--config not used; "
            "run the demo without it, or `dsbc run` for your own config (see dsbc demo --help)"
        )
    # and its --help says so (it said "Config file (default: $DSBC_CONFIG or ./dsbc.toml)")
    text = " ".join(dsbc("demo", "--help").stdout.split())
    assert "-c, --config FILE Not used: the demo writes its own config and store (in --dir)" in text, text
    assert "--store URL Not used" in text and "overrides store.url" not in text, text


def test_import_never_takes_an_identity_of_a_customer_not_in_the_file(home: Path) -> None:
    """A typo in an import file must not re-home another customer's live account (to
    another system, if it lives there): refused, nothing imported.  Moving an identity
    between customers is done by giving both rows in one file."""
    (home / "a.csv").write_text("customer_id,identities,system\n42,account:1001;did:15550100,target\n")
    assert dsbc("import", "a.csv").exit_code == 0
    (home / "b.csv").write_text("customer_id,identities\n53,account:1001\n")
    assert one_line_error(dsbc("import", "b.csv")) == (
        "b.csv:2: customer 53: account:1001 belongs to customer 42: to move it, give customer "
        "42's row without it in the same import (or PUT customer 42 without it first); "
        "nothing was imported")
    assert "customer: 42" in dsbc("where", "account:1001").stdout
    (home / "c.csv").write_text("customer_id,identities,system\n53,account:1001,target\n42,did:15550100,\n")
    assert dsbc("import", "c.csv").exit_code == 0
    assert "customer: 53" in dsbc("where", "account:1001").stdout


def test_import_never_splits_a_group(home: Path) -> None:
    """A group (an IVR's access number shared by its members) lives on one system: an import
    that would leave members on both is refused, whether they are all in the file or some
    are stored already; `dsbc migrate` is how a group moves."""
    (home / "a.csv").write_text("customer_id,identities,system,group\n1,account:1,source,ivr\n"
                                "2,account:2,target,ivr\n")
    assert one_line_error(dsbc("import", "a.csv")) == (
        "a.csv:2: group 'ivr' would be split (1 on source; 2 on target): its members move "
        "together, with `dsbc migrate` (or name the group's members on one system); nothing was imported")
    assert dsbc("where", "account:1").exit_code == 1  # nothing was imported
    (home / "b.csv").write_text("customer_id,identities,group\n1,account:1,ivr\n2,account:2,ivr\n")
    assert dsbc("import", "b.csv").exit_code == 0
    (home / "c.csv").write_text("customer_id,identities,system,group\n3,account:3,target,ivr\n")
    assert one_line_error(dsbc("import", "c.csv")).startswith(
        "c.csv:2: group 'ivr' would be split (1, 2 on source; 3 on target)")
    # the same group moved with `dsbc migrate`, then a new member on its system: fine
    assert dsbc("migrate", "--customer", "1", "--customer", "2").exit_code == 0
    assert dsbc("import", "c.csv").stdout == "imported 1 customers, 1 identities\n"
    # a new member named without a system would be on the source, its group is on the target
    (home / "d.csv").write_text("customer_id,identities,system,group\n3,account:3,,\n4,account:4,,ivr\n")
    assert one_line_error(dsbc("import", "d.csv")).startswith("d.csv:3: group 'ivr' would be split")


@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:abc", "http://a b", "ftp://x",
                                 "http://127.0.0.1:99999", "http://:80"])
def test_a_node_url_that_is_not_one_is_bad_usage(home: Path, url: str) -> None:
    """Found by an audit: `--node http://[::1` or `http://127.0.0.1:abc` ended in a traceback
    (ValueError, http.client.InvalidURL), exit 1."""
    dsbc("import", "customers.csv")
    for args in (("status",), ("where", "account:a1"), ("migrate", "--customer", "1"), ("rollback", "b-x")):
        line = one_line_error(dsbc(*args, "--node", url))
        assert line.startswith(f"--node: {url!r} is not a node's control API URL"), line


def test_an_argument_that_is_not_utf8_is_bad_usage(home: Path) -> None:
    """Found by an audit: `dsbc where account:<0xff>` (a Latin-1 terminal) ended in a
    traceback (UnicodeEncodeError), exit 1, in where, rollback, migrate and audit."""
    for args in ([b"where", b"account:\xff"], [b"rollback", b"\xff"], [b"migrate", b"--customer", b"\xff"],
                 [b"audit", b"--batch", b"\xff"]):
        r = subprocess.run([sys.executable, "-m", "dsbc.cli", *args], capture_output=True, text=True,
                           timeout=60, check=False)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "is not UTF-8 text" in r.stderr and "Traceback" not in r.stderr


def test_an_import_that_names_no_group_keeps_the_stored_one(home: Path) -> None:
    """Found by an audit: re-importing customers from a file without a group column (or a
    JSON row without "group") took them out of their groups: the next migration split the
    group without a word.  A row that names no group keeps the stored one, as for system."""
    from dsbc.store import open_store

    (home / "g.csv").write_text("customer_id,identities,group\n71,account:g71,ivr\n72,account:g72,ivr\n")
    assert dsbc("import", "g.csv").exit_code == 0
    (home / "more.csv").write_text("customer_id,identities\n71,account:g71;did:5557100\n")
    assert dsbc("import", "more.csv").exit_code == 0
    (home / "more.jsonl").write_text('{"customer_id": "72", "identities": ["account:g72"]}\n')
    assert dsbc("import", "more.jsonl").exit_code == 0
    s = open_store(f"sqlite:///{home}/loc.db")
    try:
        assert s.customer("71").group == "ivr" and s.customer("72").group == "ivr"  # type: ignore[union-attr]
        assert s.customer("71").identities == ("account:g71", "did:5557100")  # type: ignore[union-attr]
    finally:
        s.close()
    r = dsbc("migrate", "--customer", "71")
    assert r.exit_code == 2 and "group 'ivr' must move together: missing customer(s) 72" in r.stderr
    (home / "none.jsonl").write_text('{"customer_id": "72", "identities": ["account:g72"], "group": ""}\n')
    assert dsbc("import", "none.jsonl").exit_code == 0  # an empty group, named: leaves it


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0?prefx=one:", "rediss://127.0.0.1:1/0?ssl_ca_cert=/x.pem",
                                 "redis+sentinel://127.0.0.1:1/dsbc?prefx=one:",
                                 # redis-py parses it (for BlockingConnectionPool), its pool refuses it
                                 "redis://127.0.0.1:1/0?timeout=5"])
def test_a_mistyped_store_url_option_is_named(home: Path, url: str) -> None:
    """`?prefx=one:` (for `?prefix=`) ended in a TypeError traceback from redis-py on a
    redis:// URL, and was ignored on a Sentinel one (the keys went under the default prefix,
    another deployment's)."""
    option = url.rpartition("?")[2].partition("=")[0]
    line = one_line_error(dsbc("where", "account:a", "--store", url))
    assert f"unknown option {option!r}" in line and "prefix" in line, line
    (home / "dsbc.toml").write_text(f'[store]\nurl = "{url}"\n')
    line = one_line_error(dsbc("run", "--check"))
    assert line.startswith("dsbc: dsbc.toml:2: store.url: ") and f"unknown option {option!r}" in line, line


def test_a_config_without_control_api_asks_no_node(home: Path) -> None:
    """With `[control] enabled = false`, `dsbc status` and `--node local` still called
    127.0.0.1:8080 (control.listen's default), whatever listened there: another program,
    or another deployment's node, was reported as this node."""
    (home / "dsbc.toml").write_text(f'[store]\nurl = "sqlite:///{home}/loc.db"\n[control]\nenabled = false\n')
    assert dsbc("import", "customers.csv").exit_code == 0
    served: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"pid": 999}')

        def log_message(self, *args: object) -> None:
            pass

    try:
        server = http.server.HTTPServer(("127.0.0.1", 8080), Handler)
    except OSError:
        pytest.skip("127.0.0.1:8080 is taken")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = dsbc("status")
        assert r.exit_code == 0, r.stderr
        assert "control API is off in this config (control.enabled = false)" in r.stdout, r.stdout
        assert "customers 4" in r.stdout
        line = one_line_error(dsbc("where", "--node", "local", "account:alice"))
        assert "control.enabled = false" in line and "--node URL" in line, line
    finally:
        server.shutdown()
        server.server_close()
    assert served == []


def test_a_semicolon_separated_csv_is_named_as_such(home: Path) -> None:
    """A spreadsheet saved as CSV in a European locale separates fields with ";": the whole
    header was taken for one unknown column name, with no word about the separator."""
    (home / "semi.csv").write_text("customer_id;identities;system;group\n71;account:7002;source;\n")
    line = one_line_error(dsbc("import", "semi.csv"))
    assert line.startswith("semi.csv:1: ") and "separated by ';'" in line and "commas" in line, line
    # the same file as a batch: its header was taken for a customer id ("unknown customer(s)")
    line = one_line_error(dsbc("migrate", "--batch", "semi.csv", "--dry-run"))
    assert line.startswith("semi.csv:1: ") and "separated by ';'" in line and "commas" in line, line


def test_redis_py_options_of_a_store_url_are_taken() -> None:
    """The pool's own option (max_connections) and the connection's pass the check."""
    from dsbc.store.redis_conn import parse_redis_url

    for url in ("redis://h/0?max_connections=50&socket_timeout=5&health_check_interval=10",
                "rediss://h/0?ssl_ca_certs=/x.pem&ssl_cert_reqs=none&protocol=3"):
        assert parse_redis_url(url).db == 0
