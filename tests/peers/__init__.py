"""Helpers that start real peer programs on free loopback ports for integration tests.

SIP peers (proven by tests/test_peers_selftest.py against Kamailio, without dsbc):

- net.py: free_port(kind="udp"|"tcp"|"both", host), wait_port(host, port, proto, timeout),
  is_bound, loopback_alias_works("127.0.0.2"), sip_options(host, port, proto) -> reply text.
- proc.py: PeerProcess(name, argv, log_path, guard=...): own process group, SIGTERM then
  SIGKILL of the group on stop(), PDEATHSIG, nothing outlives pytest.
- kamailio.py: Kamailio(name, listen_ip, port, tcp=, dids=, extra_trusted=, outbound=,
  workdir=): a back-end SIP system (registrar with Path, DIDs, record-routing proxy, an
  "X-System: <name>" header). registered(user), registrations(user), wait_registered,
  add_did, requests(method), register_log(), rpc(method, *params), logs().
- phone.py: Phone(user, registrar_host, registrar_port, transport, bind_ip, ...): a pjsua2
  phone in its own process (phone_agent.py). register, unregister, call, wait_incoming_call,
  answer, reinvite, hangup, wait_call_state, call_info, received_invite / received_messages.
- nat.py: UdpNat(server): the server sees the NAT's address, the Contact the phone's.
- sipp.py: run_sipp(scenario, remote, ...) -> SippResult; SippServer (background UAS).
  Scenarios in sipp/: uac_call, uac_call_to_did, uac_cancel, uas_answer, register, options.
- sipmsg.py: parse_message(raw) -> SipText (start line, headers by name, body).
- redis.py: RedisServer(workdir): redis-server on a free port, appendonly (restart() keeps
  the data), url, client(); TcpProxy(upstream): cut() / stall() / heal() a connection to it.
- dsbc.py: Dsbc(workdir, source=, target=, customers=, store_url=, ...): `dsbc run`;
  cli(...), control(method, path, body) for the control API, status(), counters().

tests/conftest.py wraps them in fixtures: kamailio_factory, phone_factory, tmp_workdir,
peer_logs; require_binary(name) skips a test when a program is missing.
"""
