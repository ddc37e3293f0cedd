"""Config errors name file:line and the key; good configs load."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsbc.config import Config, ConfigError, Endpoint, load_config, parse_config, parse_hostport

GOOD = """\
# a complete dsbc.toml
[store]
url = "sqlite:///var/lib/dsbc/location.db"
unknown = "source"

[systems.source]
name = "MR100"
sip = ["udp:10.0.0.10:5060", "tcp:10.0.0.11:5060"]
api = "https://mr100.example.com"
radius = ["10.0.0.12:1812"]
radius_secret = "s3"

[systems.target]
name = "MR115"
sip = [
  "udp:10.0.1.10:5060",   # two nodes
  "udp:10.0.1.11:5060",
]
api = "https://mr115.example.com"

[sip]
listen = ["udp:0.0.0.0:5060", "tcp:0.0.0.0:5060"]
trusted_peers = ["192.0.2.0/24", "198.51.100.7", "203.0.113.9:5060"]
workers = 2
migration_expires = 60

[api]
listen = ["0.0.0.0:8443"]

[[api.vhosts]]
host = "admin.example.com"
realm = "admin"

[[api.vhosts]]
host = "mybilling.example.com:8444"
realm = "customer"

[radius]
enabled = true

[[radius.clients]]
address = "10.1.0.0/16"
secret = "nas"

[control]
listen = "127.0.0.1:8080"
token = "t0ken"
"""


def test_good_config() -> None:
    cfg = parse_config(GOOD, "dsbc.toml")
    assert isinstance(cfg, Config) and cfg.path == "dsbc.toml"
    assert cfg.system("target").name == "MR115" and len(cfg.systems.target.sip) == 2
    assert [v.realm for v in cfg.api.vhosts] == ["admin", "customer"]
    assert cfg.radius.clients[0].secret == "nas"


def test_empty_config_is_all_defaults() -> None:
    cfg = parse_config("", "dsbc.toml")
    assert cfg.store.unknown == "source" and cfg.sip.migration_expires == 60


def replace(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # unknown keys and tables
        (replace('unknown = "source"', 'unknown = "source"\nunkown = "target"'),
         "dsbc.toml:5: store.unkown: unknown key 'unkown'"),
        (GOOD + "\n[bogus]\nx = 1\n", "dsbc.toml:49: bogus: unknown key 'bogus'"),
        (replace('host = "mybilling.example.com:8444"', 'host = "mybilling.example.com:8444"\nrelam = "x"'),
         "dsbc.toml:36: api.vhosts[1].relam: unknown key 'relam'"),
        # bad values, each at its own line
        (replace('unknown = "source"', 'unknown = "sideways"'),
         "dsbc.toml:4: store.unknown: 'sideways' is not one of source, target, reject"),
        (replace('url = "sqlite:///var/lib/dsbc/location.db"', 'url = "mysql://db/x"'),
         ("dsbc.toml:3: store.url: unsupported store url 'mysql://db/x' (sqlite:///path, "
          "redis://host:port/db or redis+sentinel://host:port/service)")),
        (replace("workers = 2", "workers = 0"), "dsbc.toml:24: sip.workers: must be between 1 and 256"),
        (replace("workers = 2", 'workers = "two"'), "dsbc.toml:24: sip.workers: expected an integer, got a string"),
        # a short key stopped every worker with a traceback, after `dsbc run --check` said ok
        (replace("workers = 2", 'workers = 2\nflow_secret = "s3cret"'),
         "dsbc.toml:25: sip.flow_secret: must be at least 16 octets (\"\" = made once and kept in the store)"),
        (replace('"198.51.100.7"', '"not-an-ip"'),
         "dsbc.toml:23: sip.trusted_peers[1]: 'not-an-ip' is not a CIDR, an IP or IP:PORT"),
        (replace('api = "https://mr115.example.com"', 'api = "ftp://mr115"'),
         "dsbc.toml:19: systems.target.api: 'ftp://mr115' is not an http:// or https:// URL"),
        # these passed the start, then every request to that system was a traceback in the
        # worker ("Fatal error on transport") and a fault for the client (found by an audit)
        (replace('api = "https://mr115.example.com"', 'api = "http://::1:8080"'),
         ("dsbc.toml:19: systems.target.api: 'http://::1:8080' is not a usable URL: ambiguous address "
          "'::1:8080': write [::1]:8080 for address ::1 port 8080, or [::1:8080] for the address ::1:8080")),
        (replace('api = "https://mr115.example.com"', 'api = "https://[2001:db8::1/rest"'),
         "dsbc.toml:19: systems.target.api: 'https://[2001:db8::1/rest' is not a usable URL: bad address '[2001:db8::1'"),
        (replace('api = "https://mr115.example.com"', 'api = "https://[2001:db8::1]:99999"'),
         "dsbc.toml:19: systems.target.api: 'https://[2001:db8::1]:99999' is not a usable URL: bad port in '[2001:db8::1]:99999'"),
        (replace('"udp:10.0.1.11:5060"', '"udp:10.0.1.11:99999"'),
         "dsbc.toml:17: systems.target.sip[1]: bad port in '10.0.1.11:99999'"),
        (replace('realm = "customer"', 'realm = "nobody"'),
         ("dsbc.toml:36: api.vhosts[1].realm: unknown realm 'nobody' (one of account, admin, cc_staff, cpe, "
          "customer, distributor, porting, representative, reseller, vendor)")),
        (replace('host = "admin.example.com"\n', ""),
         "dsbc.toml:30: api.vhosts[0]: missing required key 'host'"),
        (replace('address = "10.1.0.0/16"', 'address = "10.1.0.0/99"'),
         "dsbc.toml:42: radius.clients[0].address: '10.1.0.0/99' is not a CIDR, an IP or IP:PORT"),
        (replace('[[radius.clients]]\naddress = "10.1.0.0/16"\nsecret = "nas"\n', ""),
         "dsbc.toml:39: radius.clients: RADIUS is enabled but no client is configured"),
        (replace('listen = "127.0.0.1:8080"', 'listen = "127.0.0.1:0"'),
         "dsbc.toml:46: control.listen: bad port in '127.0.0.1:0'"),
        (replace('listen = ["udp:0.0.0.0:5060", "tcp:0.0.0.0:5060"]', 'listen = "udp:0.0.0.0:5060"'),
         "dsbc.toml:22: sip.listen: expected a list, got a string"),
        (replace('listen = ["udp:0.0.0.0:5060", "tcp:0.0.0.0:5060"]', 'listen = ["tls:0.0.0.0:5061"]'),
         "dsbc.toml:21: sip.tls_cert: a tls: listener needs tls_cert and tls_key"),
        (replace("migration_expires = 60", "migration_expires = 0"),
         "dsbc.toml:25: sip.migration_expires: must be >= 1"),
        (GOOD + '\n[log]\nlevel = "loud"\n', "dsbc.toml:50: log.level: 'loud' is not one of debug, info, warning, error"),
        (replace('unknown = "source"', "poll_interval = 0"), "dsbc.toml:4: store.poll_interval: must be > 0"),
        # values that used to pass validation and only failed (or misbehaved) at run time
        (replace("workers = 2", "workers = 2\noptions_interval = 0"),
         "dsbc.toml:25: sip.options_interval: must be > 0"),
        (replace("workers = 2", "workers = 2\noptions_timeout = -1"),
         "dsbc.toml:25: sip.options_timeout: must be > 0"),
        (replace("workers = 2", "workers = 2\nretry_after = -1"),
         "dsbc.toml:25: sip.retry_after: must be >= 0"),
        (replace("workers = 2", 'workers = 2\nadvertise = "not a host!"'),
         "dsbc.toml:25: sip.advertise: bad address 'not a host!': 'not a host!' is not a host name or an IP address"),
        (replace("workers = 2", 'workers = 2\nadvertise = "203.0.113.10:99999"'),
         "dsbc.toml:25: sip.advertise: bad port in '203.0.113.10:99999'"),
        (replace('listen = ["udp:0.0.0.0:5060", "tcp:0.0.0.0:5060"]', 'listen = ["sctp:0.0.0.0:5060"]'),
         "dsbc.toml:22: sip.listen[0]: unknown transport 'sctp' in 'sctp:0.0.0.0:5060' (udp, tcp or tls)"),
        (replace('"udp:10.0.1.11:5060"', '"10.0.1.11:5060:7"'),
         ("dsbc.toml:17: systems.target.sip[1]: bad address '10.0.1.11:5060:7' "
          "(an IPv6 address with a port is written [addr]:port)")),
        (replace('"udp:10.0.1.11:5060"', '"udp:10.0.1.311:5060"'),
         ("dsbc.toml:17: systems.target.sip[1]: bad address '10.0.1.311:5060': "
          "'10.0.1.311' is not a host name or an IP address")),
        ("[api]\nsession_ttl = -1\n", "dsbc.toml:2: api.session_ttl: must be >= 1 (seconds)"),
        ("[api]\nmax_header_size = 100\n", "dsbc.toml:2: api.max_header_size: must be >= 1024"),
        # found by an audit: these named the key (and the line) before them
        ("[api]\nmax_header_size = 2048\nmax_body_size = -1\n", "dsbc.toml:3: api.max_body_size: must be >= 0"),
        ("[api]\nmax_connections = 10\nmax_connections_per_ip = 0\n",
         "dsbc.toml:3: api.max_connections_per_ip: must be >= 1"),
        ("[sip]\nmax_connections = 10\nmax_connections_per_ip = -1\n",
         "dsbc.toml:3: sip.max_connections_per_ip: must be >= 1"),
        ("[sip]\nmax_connections = 0\n", "dsbc.toml:2: sip.max_connections: must be >= 1"),
        ("[radius]\ntimeout = 0\n", "dsbc.toml:2: radius.timeout: must be > 0 (seconds)"),
        ("[radius]\nretries = -1\n", "dsbc.toml:2: radius.retries: must be >= 0"),
        ("[radius]\nduplicate_window = -1\n", "dsbc.toml:2: radius.duplicate_window: must be >= 0 (seconds)"),
        # empty secrets and names, and one port for both RADIUS services: refused at start
        ('[radius]\nacct_listen = "0.0.0.0:1812"\n',
         ("dsbc.toml:2: radius.acct_listen: '0.0.0.0:1812' is auth_listen's address and port too "
          "(accounting needs a port of its own, 1813 by default)")),
        ('[radius]\n[[radius.clients]]\naddress = "10.0.0.1"\nsecret = ""\n',
         "dsbc.toml:4: radius.clients[0].secret: must not be empty (RFC 2865: the client's shared secret)"),
        (('[systems.source]\nradius = ["10.0.0.5"]\n[radius]\nenabled = true\n'
         '[[radius.clients]]\naddress = "10.0.0.1"\nsecret = "s"\n'),
         ("dsbc.toml:2: systems.source.radius_secret: must not be empty when RADIUS servers are set "
          "(RFC 2865: the shared secret)")),
        ('[diameter]\norigin_host = ""\n',
         "dsbc.toml:2: diameter.origin_host: must not be empty (it names dsbc in every CER and answer)"),
        # a vhost without a back end (none of its own, no api.source, no systems.source.api):
        # the API worker used to crash in a loop with a traceback at start
        ('[api]\n[[api.vhosts]]\nhost = "a"\nrealm = "customer"\ntarget = "http://t"\n',
         ("dsbc.toml:2: api.vhosts[0].source: vhost 'a' has no source back end "
          "(set it here, or api.source, or systems.source.api)")),
        # found by an audit: accepted, then broken at run time
        ('[store]\npoll_interval = nan\n',  # every "> 0" check passes a nan; the poll task died
         "dsbc.toml:2: store.poll_interval: must be a finite number (not nan or inf)"),
        ('[sip]\noptions_interval = inf\n',
         "dsbc.toml:2: sip.options_interval: must be a finite number (not nan or inf)"),
        ('[sip]\ntcp_idle_timeout = 0\n',  # every TCP connection closed at once
         "dsbc.toml:2: sip.tcp_idle_timeout: must be > 0 (seconds a TCP or TLS connection may stay silent)"),
        ('[sip]\ntcp_stall_timeout = 0\n',
         "dsbc.toml:2: sip.tcp_stall_timeout: must be > 0 (seconds a half-received message may take)"),
        ('[sip]\naliases = ["sip example"]\n',
         "dsbc.toml:2: sip.aliases[0]: bad address 'sip example': 'sip example' is not a host name or an IP address"),
        ('[control]\ntoken = "s3cret "\n',  # every call a 401: clients send it without the space
         "dsbc.toml:2: control.token: must not begin or end with a space or a newline"),
        ('[api]\nsource = "http://s"\n',  # one back end: every request a 500
         ("dsbc.toml:2: api.target: api.source is set but there is no target back end "
         "(api.target or systems.target.api; or [api] enabled = false)")),
        ('[api]\nsource = "https://user:pw@10.0.0.1"\ntarget = "https://10.0.1.1"\n',  # was dropped silently
         "dsbc.toml:2: api.source: a user name or password in the URL is not used (no 'user:pass@')"),
        ('[store]\nurl = "sqlite:///var/lib/dsbc/location.db?mode=ro"\n',  # made a file named so
         "dsbc.toml:2: store.url: 'sqlite:///var/lib/dsbc/location.db?mode=ro': a sqlite URL takes a path only (no ?options)"),
        ('[store]\nurl = "sqlite:///"\n',  # a temporary database: nothing kept
         "dsbc.toml:2: store.url: 'sqlite:///' names no file (sqlite:///path/location.db)"),
        ('[sip]\ndrop_scanners = true\nscanner_user_agents = []\n',
         "dsbc.toml:3: sip.scanner_user_agents: empty while drop_scanners = true (nothing would be dropped)"),
        # found by the configuration audit: accepted, then broken at run time
        ('[sip]\nadvertise = "0.0.0.0"\n',  # written in every Via, Record-Route and Path
         ("dsbc.toml:2: sip.advertise: '0.0.0.0' is a wildcard, not an address peers can reach "
          "(give the VIP, or this node's public address)")),
        ('[sip]\nadvertise = "[::]:5060"\n',
         ("dsbc.toml:2: sip.advertise: '::' is a wildcard, not an address peers can reach "
          "(give the VIP, or this node's public address)")),
        ('[sip]\nworkers = 1\nadvertise_ipv6 = "::"\n',  # was named "sip: advertise_ipv6: ..." on line 1
         ("dsbc.toml:3: sip.advertise_ipv6: '::' is a wildcard, not an address peers can reach "
          "(give the VIP, or this node's public address)")),
        ('[sip]\nworkers = 1\nadvertise_ipv6 = "x"\n',
         "dsbc.toml:3: sip.advertise_ipv6: 'x' is not an IPv6 address"),
        # a vhost host that no Host header can match: every request got unknown_host
        ('[api]\n[[api.vhosts]]\nhost = "*.example.com"\n',
         ("dsbc.toml:3: api.vhosts[0].host: bad address '*.example.com': '*.example.com' is not a host "
          'name or an IP address (a host name or IP with an optional :port, or "*" alone for any host: '
          "no *.domain wildcards)")),
        ('[api]\n[[api.vhosts]]\nhost = "https://www.example.com/"\n',
         ("dsbc.toml:3: api.vhosts[0].host: 'https://www.example.com/': the name the clients send in "
          'Host, not a URL (e.g. "www.example.com" or "www.example.com:8443")')),
        ('[api]\n[[api.vhosts]]\nhost = ""\n',
         'dsbc.toml:3: api.vhosts[0].host: must not be empty (a host name or IP, or "*" for any host)'),
        # a second entry for one NAS: its secret was never used (the first one answered)
        (('[radius]\n[[radius.clients]]\naddress = "10.0.0.0/24"\nsecret = "a"\n'
          '[[radius.clients]]\naddress = "10.0.0.1/24"\nsecret = "b"\n'),
         "dsbc.toml:6: radius.clients[1].address: '10.0.0.1/24' is radius.clients[0]'s too (one secret per NAS)"),
        # listeners that serve nothing: the node said "ready: sip" and answered nothing
        ('[sip]\nlisten = []\n',
         ("dsbc.toml:2: sip.listen: empty while SIP is enabled (udp:IP:PORT, tcp:... or tls:... "
          "entries; or enabled = false)")),
        ('[api]\nlisten = []\nsource = "http://s"\ntarget = "http://t"\n',
         "dsbc.toml:2: api.listen: empty while the API dispatcher runs (IP:PORT entries; or [api] enabled = false)"),
        # the key written is the key named (was api.body_timeout, on line 1, for any of three)
        ('[api]\ntimeout = 0\n', "dsbc.toml:2: api.timeout: must be > 0 (seconds)"),
        ('[api]\nconnect_timeout = -1\n', "dsbc.toml:2: api.connect_timeout: must be > 0 (seconds)"),
        # was "dsbc.toml:1: radius.acct_listen: bad port in '0.0.0.0:65536'", a key not written
        ('[radius]\nauth_listen = "0.0.0.0:65535"\n',
         "dsbc.toml:2: radius.auth_listen: port 65535 leaves no port + 1 for accounting (set acct_listen)"),
        # was "(an IPv6 address with a port is written [addr]:port)"
        ('[api]\nlisten = ["https://0.0.0.0:443"]\n',
         "dsbc.toml:2: api.listen[0]: bad address 'https://0.0.0.0:443': HOST:PORT, not a URL"),
        # was "expected bool | array"
        ('[sip]\ntls_verify_client = "yes"\n',
         "dsbc.toml:2: sip.tls_verify_client: expected true or false or a list, got a string"),
        # one bracket too few or too many around a table header: say which is wanted
        ('[api]\nlisten = ["127.0.0.1:8443"]\n\n[api.vhosts]\nhost = "a"\n',
         "dsbc.toml:4: api.vhosts: expected a list, got a table (one [[api.vhosts]] header per entry, two brackets)"),
        ('[radius.clients]\naddress = "10.0.0.1"\nsecret = "s"\n',
         ("dsbc.toml:1: radius.clients: expected a list, got a table "
          "(one [[radius.clients]] header per entry, two brackets)")),
        ('[[systems.source]]\nname = "MR100"\n',
         "dsbc.toml:1: systems.source: expected a table, got a list (write [systems.source], one bracket)"),
        ('store = []\n', "dsbc.toml:1: store: expected a table, got a list"),
        ('[sip.listen]\nx = 1\n', "dsbc.toml:1: sip.listen: expected a list, got a table"),
        # TOML syntax
        # TOML syntax: the key or table written on that line is named (a key or table
        # defined twice, with the line of the first; was "Cannot overwrite a value" alone)
        (replace("workers = 2", "workers = "), "dsbc.toml:24: sip.workers: TOML syntax error: Invalid value"),
        (replace("workers = 2", "workers = 2\nworkers = 3"),
         "dsbc.toml:25: sip.workers: TOML syntax error: defined twice (first at line 24)"),
        (replace("[api]\n", "[api]\n[sip]\nenabled = true\n"),
         "dsbc.toml:28: sip: TOML syntax error: defined twice (first at line 21)"),
        ('[systems.source]\nname = "a"\n[systems]\nsource = { name = "b" }\n',
         "dsbc.toml:4: systems.source: TOML syntax error: defined twice (first at line 1)"),
        ('[store]\nurl = "sqlite:///x', "dsbc.toml:2: store.url: TOML syntax error: Unterminated string"),
        ('[store\nurl = "x"\n', "dsbc.toml:1: TOML syntax error: Expected ']' at the end of a table declaration"),
    ],
)
def test_errors_name_line_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "dsbc.toml")
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # dotted keys and inline tables are found too
        ('# top\n\nstore.url = "mysql://x"\n', "dsbc.toml:3: store.url: unsupported store url"),
        ('[systems]\nsource = { name = "MR100", api = "x" }\n',
         "dsbc.toml:2: systems.source.api: 'x' is not an http:// or https:// URL"),
        # an entry of a multi-line list: its own line (was the list's first line)
        ('[api]\nvhosts = [\n  { host = "a" },\n  { host = "b", realm = "nobody" },\n]\n',
         "dsbc.toml:4: api.vhosts[1].realm: unknown realm 'nobody'"),
        ('[sip]\ntrusted_peers = [\n  "10.0.0.0/8",  # a comment, [brackets], "quotes"\n  \'10.0.0.300\',\n]\n',
         "dsbc.toml:4: sip.trusted_peers[1]: '10.0.0.300' is not a CIDR"),
        ('[sip]\nlisten = [ "udp:127.0.0.1:5060",\n  [1], 5 ]\n', "dsbc.toml:3: sip.listen[1]: expected a string, got a list"),
        ('[sip]\nlisten = [\n  """udp:127.0.0.1:5060""", """\n]""",\n  5,\n]\n',
         "dsbc.toml:5: sip.listen[2]: expected a string, got an integer"),
        # a header-looking line inside a multi-line array is not a table
        ('[sip]\ntrusted_peers = [\n  "10.0.0.1",\n]\n[store]\nunknown = "x"\n',
         "dsbc.toml:6: store.unknown: 'x' is not one of"),
        ('[sip]\nflow_secret = """\n[store]\nunknown = 1\n"""\nworkers = -1\n',
         "dsbc.toml:6: sip.workers: must be between 1 and 256"),
        ('store = 5\n', "dsbc.toml:1: store: expected a table, got an integer"),
        ('["store"]\nunknown = "x"\n', "dsbc.toml:2: store.unknown: 'x' is not one of"),
    ],
)
def test_locating_unusual_layouts(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "dsbc.toml")
    assert str(err.value).startswith(message)


def test_load_config_files(tmp_path: Path) -> None:
    p = tmp_path / "dsbc.toml"
    p.write_text(GOOD)
    assert load_config(p).path == str(p)
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read: No such file or directory"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[store]\nurl = '\xff'\n")
    with pytest.raises(ConfigError, match=r"bad\.toml:2: not UTF-8 text"):
        load_config(bad)
    bom = tmp_path / "bom.toml"  # saved by a Windows editor: the byte-order mark is no error
    bom.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert load_config(bom).path == str(bom)
    p.write_text(replace("workers = 2", "workers = 999"))
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(err.value) == f"{p}:24: sip.workers: must be between 1 and 256"


def test_radius_accounting_listens_beside_authentication_by_default() -> None:
    """Not on 0.0.0.0:1813 when auth_listen names an address (found by an audit)."""
    assert parse_config('[radius]\nauth_listen = "127.0.0.1:25812"\n').radius.acct_listen == "127.0.0.1:25813"
    assert parse_config('[radius]\nauth_listen = "[::1]:1645"\n').radius.acct_listen == "[::1]:1646"
    assert parse_config('[radius]\nacct_listen = "10.0.0.1:1813"\n').radius.acct_listen == "10.0.0.1:1813"


def test_endpoints_and_hostports() -> None:
    assert Endpoint.parse("tcp:[::1]:5070") == Endpoint("tcp", "::1", 5070)
    assert str(Endpoint.parse("10.0.0.1")) == "udp:10.0.0.1:5060"
    assert parse_hostport("host", 80) == ("host", 80)
    assert Endpoint.parse("udp:::1") == Endpoint("udp", "::1", 5060)
    assert Endpoint.parse("tls:sip.example.com:5061") == Endpoint("tls", "sip.example.com", 5061)
    # without a port: SIP's default, 5061 for TLS (RFC 3261 19.1.2), so tcp: and tls: on
    # one address do not collide
    assert Endpoint.parse("tls:10.0.0.1") == Endpoint("tls", "10.0.0.1", 5061)
    assert Endpoint.parse("tcp:10.0.0.1") == Endpoint("tcp", "10.0.0.1", 5060)
    assert parse_hostport("[fe80::1%eth0]:5060") == ("fe80::1%eth0", 5060)
    for bad in ("host", "h:0", "h:x", "[::1", "1.2.3.4:5060:7", "a b:5060"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


@pytest.mark.parametrize(("text", "message"), [
    # an empty port was taken for the default one, as nginx refuses "listen 10.0.0.1:;"
    ('[systems.source]\ndiameter = "10.0.0.1:"\n', "dsbc.toml:2: systems.source.diameter: bad address '10.0.0.1:': no port after ':'"),
    ('[control]\nlisten = "127.0.0.1:"\n', "dsbc.toml:2: control.listen: bad address '127.0.0.1:': no port after ':'"),
    ('[sip]\nlisten = ["udp:127.0.0.1:"]\n', "dsbc.toml:2: sip.listen[0]: bad address '127.0.0.1:': no port after ':'"),
])
def test_an_address_with_a_colon_and_no_port_is_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "dsbc.toml")
    assert str(err.value) == message
    # in a URL an empty port is the scheme's (RFC 3986 3.2.3), as curl and aiohttp take it
    assert parse_config('[api]\nsource = "http://10.0.0.1:/"\ntarget = "https://10.0.0.2:"\n').api.source


def test_api_fast_path_switch_reaches_the_dispatcher() -> None:
    from dsbc.api_service import build_settings

    base = '[systems.source]\napi = "http://127.0.0.1:1"\n[systems.target]\napi = "http://127.0.0.1:2"\n'
    assert build_settings(parse_config(base, "dsbc.toml")).fast_path is True
    off = parse_config(base + "[api]\nfast_path = false\n", "dsbc.toml")
    assert build_settings(off).fast_path is False
    with pytest.raises(ConfigError) as err:
        parse_config(base + '[api]\nfast_path = "yes"\n', "dsbc.toml")
    assert "dsbc.toml:6: api.fast_path" in str(err.value)


@pytest.mark.parametrize(("vhosts", "message"), [
    ('[[api.vhosts]]\nhost = "www.example.com:25443"\nport = 8443\n',
     "dsbc.toml: api.vhosts[0]: vhost 'www.example.com:25443': port 8443 is not the port written in host (25443)"),
    ('[[api.vhosts]]\nhost = "portal.example.com"\n[[api.vhosts]]\nhost = "Portal.Example.com."\nrealm = "reseller"\n',
     "dsbc.toml: api.vhosts[1]: host 'portal.example.com' on any port is api.vhosts[0]'s too"),
])
def test_vhosts_that_could_never_be_selected_are_refused(vhosts: str, message: str) -> None:
    """Settled silently before: the port key won over the host's, the second vhost for a
    host was never used (found by an audit)."""
    from dsbc.api_service import build_settings

    cfg = parse_config(f'[api]\nsource = "http://s"\ntarget = "http://t"\n{vhosts}', "dsbc.toml")
    with pytest.raises(ConfigError) as err:
        build_settings(cfg)
    assert str(err.value) == message


def test_a_sip_alias_with_a_port_names_dsbc_on_that_port() -> None:
    from dsbc.sip_service import _alias_addresses

    assert _alias_addresses("127.0.0.9:25160", {"udp": 5060}) == [("127.0.0.9", 25160)]
    assert _alias_addresses("[::9]:5070", {"udp": 5060}) == [("::9", 5070)]
    assert sorted(_alias_addresses("SIP.example.com", {"udp": 5060, "tls": 5061})) == [
        ("sip.example.com", 5060), ("sip.example.com", 5061)]


def test_a_port_in_sip_advertise_leaves_a_tls_listener_its_own_port() -> None:
    """advertise = "VIP:5060" gave every transport that port: the Record-Route toward a TLS
    phone said ``transport=tls`` on the plain udp/tcp port, and the phone's BYE and re-INVITE
    went (TLS) to a listener that cannot take them (found by an audit).  The port stands for
    the listeners on the first one's port; a transport on a port of its own keeps it."""
    from dsbc.sip_service import advertise

    listen = '["udp:0.0.0.0:5060", "tcp:0.0.0.0:5060", "tls:0.0.0.0:5061"]'
    tls = 'tls_cert = "/etc/dsbc/cert.pem"\ntls_key = "/etc/dsbc/key.pem"\n'
    for adv, ports in (
        ("203.0.113.10:5060", {"udp": 5060, "tcp": 5060, "tls": 5061}),
        ("203.0.113.10:5070", {"udp": 5070, "tcp": 5070, "tls": 5061}),
        ("203.0.113.10", {"udp": 5060, "tcp": 5060, "tls": 5061}),
    ):
        cfg = parse_config(f'[sip]\nlisten = {listen}\nadvertise = "{adv}"\n{tls}', "dsbc.toml")
        assert advertise(cfg) == ("203.0.113.10", ports)
    # a TLS-only dsbc: the port is the TLS listener's
    cfg = parse_config(f'[sip]\nlisten = ["tls:0.0.0.0:5061"]\nadvertise = "[2001:db8::1]:443"\n{tls}', "dsbc.toml")
    assert advertise(cfg) == ("2001:db8::1", {"tls": 443})


@pytest.mark.parametrize(
    ("nodes", "listen", "message"),
    [
        ('["tls:10.0.0.1:5061"]', '["udp:0.0.0.0:5060", "tcp:0.0.0.0:5060"]',
         ("dsbc.toml:3: systems.source.sip[0]: node 'tls:10.0.0.1:5061' needs a tls: listener in sip.listen "
          "(the node sends its requests to dsbc over tls)")),
        ('["udp:10.0.0.1", "tcp:10.0.0.2"]', '["udp:0.0.0.0:5060"]',
         ("dsbc.toml:3: systems.source.sip[1]: node 'tcp:10.0.0.2' needs a tcp: listener in sip.listen "
          "(the node sends its requests to dsbc over tcp)")),
    ],
)
def test_a_tcp_or_tls_node_needs_a_listener_of_its_transport(nodes: str, listen: str, message: str) -> None:
    """A tls: node with no tls: listener started, and its calls to registered phones failed:
    the Path and Record-Route toward it said transport=tls on the udp/tcp port, where the
    node's own TLS connection cannot be taken (found by an audit)."""
    tls = 'tls_cert = "/etc/dsbc/cert.pem"\ntls_key = "/etc/dsbc/key.pem"\n'
    text = f"[systems.source]\nname = \"A\"\nsip = {nodes}\n[sip]\nlisten = {listen}\n{tls}"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "dsbc.toml")
    assert str(err.value) == message
    parse_config(text.replace(listen, '["udp:0.0.0.0:5060", "tcp:0.0.0.0:5060", "tls:0.0.0.0:5061"]'), "dsbc.toml")


def test_relative_store_paths_are_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an audit: `sqlite:///loc.db` was opened in the current directory, so a node
    started by systemd (cwd /) and a CLI command run from the config's directory, both
    given the same -c, used two different stores."""
    from dsbc.config import load_config
    from dsbc.store.sqlite_schema import sqlite_path

    etc = tmp_path / "etc"
    etc.mkdir()
    cfg_file = etc / "dsbc.toml"
    cfg_file.write_text('[store]\nurl = "sqlite:///loc.db"\ncache_file = "cache/c.json"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_file)
    assert sqlite_path(cfg.store.url) == str(etc / "loc.db")
    assert cfg.store.cache_file == str(etc / "cache" / "c.json")
    cfg_file.write_text('[store]\nurl = "sqlite:///var/lib/dsbc/loc.db"\n')  # absolute: as written
    assert sqlite_path(load_config(cfg_file).store.url) == "/var/lib/dsbc/loc.db"


def test_a_relative_store_path_of_a_config_in_the_root_stays_absolute() -> None:
    from dsbc.config import Config, _anchor_store_paths
    from dsbc.store.sqlite_schema import sqlite_path

    cfg = Config()
    cfg.store.url = "sqlite:///loc.db"
    _anchor_store_paths(cfg, Path("/"))
    assert sqlite_path(cfg.store.url) == "/loc.db"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        # found by an audit: "udp:::1:5060" listened on the address ::1:5060 ("not an address
        # of this host"), "[::1]5070" / "[::1]:" / "[::1]x" took the default port silently,
        # and brackets around a name or an IPv4 address were taken
        ("udp:::1:5060", ("ambiguous address '::1:5060': write [::1]:5060 for address ::1 port 5060, "
                         "or [::1:5060] for the address ::1:5060")),
        ("udp:[::1]5070", "bad address '[::1]5070': after [::1] only :PORT may follow"),
        ("udp:[::1]:", "bad address '[::1]:': after [::1] only :PORT may follow"),
        ("tls:[::1]x", "bad address '[::1]x': after [::1] only :PORT may follow"),
        ("udp:[sip.example.com]:5060", ("bad address '[sip.example.com]:5060': 'sip.example.com' in brackets "
                                       "is not an IPv6 address")),
        ("udp:[10.0.0.1]:5060", "bad address '[10.0.0.1]:5060': '10.0.0.1' in brackets is not an IPv6 address"),
    ],
)
def test_ipv6_address_forms_that_mean_something_else_are_refused(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(f'[sip]\nlisten = ["udp:127.0.0.1:5060", "{value}"]\n', "dsbc.toml")
    assert str(err.value) == f"dsbc.toml:2: sip.listen[1]: {message}"
    with pytest.raises(ConfigError, match=r"^dsbc.toml:2: sip.advertise: ambiguous address '::1:5070'"):
        parse_config('[sip]\nadvertise = "::1:5070"\n', "dsbc.toml")
    with pytest.raises(ConfigError, match=r"^dsbc.toml:2: sip.aliases\[0\]: bad address '\[::1\]x'"):
        parse_config('[sip]\naliases = ["[::1]x"]\n', "dsbc.toml")


def test_ip_addresses_are_written_the_way_packets_show_them() -> None:
    """A node written ``udp:[0:0::1]:5060`` or ``[FD00::0002]`` never matched the address its
    answers came from (``::1``, ``fd00::2``): it stayed down for good and was no trusted peer
    (found by an audit)."""
    assert Endpoint.parse("udp:[0:0::1]:5070") == Endpoint("udp", "::1", 5070)
    assert Endpoint.parse("tcp:[FD00::0002]") == Endpoint("tcp", "fd00::2", 5060)
    assert Endpoint.parse("udp:[::ffff:10.0.0.1]:5060") == Endpoint("udp", "10.0.0.1", 5060)
    assert parse_hostport("[2001:DB8:0:0:1:0:0:1]:1812") == ("2001:db8::1:0:0:1", 1812)
    assert parse_hostport("[fe80::01%eth0]:5060") == ("fe80::1%eth0", 5060)
    assert Endpoint.parse("udp:::1") == Endpoint("udp", "::1", 5060)  # one reading only
    cfg = parse_config('[systems.source]\nsip = ["udp:[0:0::1]:5070"]\n[sip]\nlisten = ["udp:[::1]:5060"]\n')
    from dsbc.sip_service import system_nodes, trusted_peers

    assert [(n.host, n.port) for n in system_nodes(cfg)] == [("::1", 5070)]
    assert trusted_peers(cfg).contains("::1", 5070)


def test_trusted_peers_take_ipv6_in_brackets() -> None:
    """``"[::1]"`` and ``"[2001:db8::]/32"`` were "not a CIDR, an IP or IP:PORT" though
    ``"[::1]:5060"`` was one (found by an audit)."""
    from dsbc.sip_service import peer_set

    cfg = parse_config('[sip]\ntrusted_peers = ["[::1]", "[2001:db8::]/32", "[::2]:5060"]\n'
                       '[[radius.clients]]\naddress = "[2001:db8::]/48"\nsecret = "s"\n')
    peers = peer_set(cfg.sip.trusted_peers)
    assert peers.contains("::1", 1234) and peers.contains("2001:db8::7", 5060) and peers.contains("::2", 5060)
    assert not peers.contains("::2", 5061) and not peers.contains("2001:db9::1", 5060)


@pytest.mark.parametrize("pattern, why", [("([0-9a-f]{12}", "missing )"),
                                          ("[0-9a-f]{12}\\.cfg", "needs a group around the MAC")])
def test_a_bad_api_cpe_pattern_stops_the_start(pattern: str, why: str) -> None:
    """api.cpe_patterns is used only by cpe-realm vhosts without patterns of their own: with
    none configured a pattern that does not compile, or has no group, passed the check and
    the start, though a vhost's own bad pattern is refused (SPEC 5: a bad value stops it)."""
    text = ('[api]\nlisten = ["127.0.0.1:8443"]\nsource = "http://127.0.0.1:1"\n'
            f'target = "http://127.0.0.1:2"\ncpe_patterns = [{pattern!r}]\n').replace("'", '"')
    text = text.replace("\\", "\\\\")
    with pytest.raises(ConfigError) as err:
        parse_config(text, "dsbc.toml")
    assert str(err.value).startswith("dsbc.toml:5: api.cpe_patterns[0]: ") and why in str(err.value), err.value
