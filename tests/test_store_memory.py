"""Identities, row validation and the in-memory index (no disk)."""

from __future__ import annotations

import gc
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsbc.store import (
    KINDS,
    BadIdentity,
    BadRow,
    Customer,
    MemoryIndex,
    clean_row,
    new_batch_id,
    normalise,
    normalise_keys,
    open_store,
    parse_identity,
)

# --- normalisation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("did:+1 555 0100", ("did", "15550100")),
        ("did:(555) 010-0100", ("did", "5550100100")),
        ("DID:15550100", ("did", "15550100")),
        ("msisdn:+44 7700 900123", ("msisdn", "447700900123")),
        ("imsi:001010123456789", ("imsi", "001010123456789")),
        ("i_account:  42 ", ("i_account", "42")),
        ("cpe:00:1A:2b:3C:4d:5E", ("cpe", "001a2b3c4d5e")),
        ("cpe:001a.2b3c.4d5e", ("cpe", "001a2b3c4d5e")),
        ("account:Alice", ("account", "Alice")),  # case-sensitive
        ("login:bob@example.com", ("login", "bob@example.com")),
        ("radius:user@realm", ("radius", "user@realm")),
        ("account:a:b", ("account", "a:b")),  # only the first colon separates
        # database ids are numbers: the API sends i_account 42 for an export's 0042
        ("i_account:0042", ("i_account", "42")),
        ("i_did_number:000", ("i_did_number", "0")),
        ("did:0044 20 7946 0000", ("did", "00442079460000")),  # a number's zeros count
    ],
)
def test_parse_identity(text: str, expected: tuple[str, str]) -> None:
    assert parse_identity(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("did:12ab", "did:'12ab' is not a number"),
        ("i_account:x", "i_account:'x' is not a number"),
        ("cpe:00:11:22", "cpe:'00:11:22' is not a MAC address"),
        ("phone:123", "unknown identity kind 'phone'"),
        ("account:", "account: empty value"),
        ("alice", "'alice' is not KIND:VALUE"),
        ("did:١٢٣", "is not a number"),  # non-ASCII digits
    ],
)
def test_bad_identity(text: str, message: str) -> None:
    with pytest.raises(BadIdentity, match=re.escape(message)):
        parse_identity(text)


@given(st.sampled_from(KINDS), st.text(min_size=1, max_size=30))
def test_normalise_is_idempotent(kind: str, value: str) -> None:
    try:
        once = normalise(kind, value)
    except BadIdentity:
        return
    assert normalise(kind, once) == once


@given(st.sampled_from(["did", "msisdn", "imsi", "i_account"]), st.integers(min_value=0, max_value=10**15))
def test_numbers_survive_formatting(kind: str, n: int) -> None:
    digits = str(n)
    spaced = " ".join(digits[i:i + 3] for i in range(0, len(digits), 3))
    assert normalise(kind, spaced) == digits


def test_normalise_keys_dedupes_and_accepts_a_string() -> None:
    assert normalise_keys("did:+1 555 0100; account:alice;;did:15550100") == ("did:15550100", "account:alice")
    assert normalise_keys(["account:a", "cpe:AA-BB-CC-DD-EE-FF"]) == ("account:a", "cpe:aabbccddeeff")


# --- rows -------------------------------------------------------------------------------


def test_clean_row() -> None:
    r = clean_row({"customer_id": 42, "identities": "did:+1555;account:x", "system": " Target ", "group": "ivr"})
    assert (r.customer_id, r.identities, r.system, r.group) == ("42", ("did:1555", "account:x"), "target", "ivr")
    assert clean_row({"customer_id": "7", "identities": []}).system is None  # keep the stored system


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"customer_id": "", "identities": []}, "customer_id: '' is not a customer id"),
        ({"customer_id": "a b", "identities": []}, "no spaces"),
        ({"customer_id": True, "identities": []}, "customer_id: True"),
        ({"customer_id": "1", "identities": ["did:x"]}, "did:'x' is not a number"),
        ({"customer_id": "1", "identities": 5}, "identities: expected a list"),
        ({"customer_id": "1", "identities": [5]}, "identity 5 is not a KIND:VALUE string"),
        ({"customer_id": "1", "system": "middle"}, "system: 'middle' is not source or target"),
        ({"customer_id": "1", "sytem": "target"}, "unknown field(s) sytem"),
    ],
)
def test_bad_rows(row: dict[str, object], message: str) -> None:
    with pytest.raises(BadRow, match=re.escape(message)):
        clean_row(row)


def test_batch_id_shape() -> None:
    bid = new_batch_id(1796191812.0)
    assert re.fullmatch(r"b-20261202-\d{6}-[0-9a-f]{4}", bid)
    assert len({new_batch_id() for _ in range(50)}) > 40  # random suffix


# --- the index --------------------------------------------------------------------------


def cust(cid: str, *keys: str, system: str = "source", state: str = "active") -> Customer:
    return Customer(cid, system, state, identities=keys)


def test_put_lookup_replace_remove() -> None:
    idx = MemoryIndex()
    idx.put(cust("1", "account:a", "did:100"))
    loc = idx.lookup("did", "100")
    assert loc is not None and (loc.customer_id, loc.system, loc.state) == ("1", "source", "active")
    assert idx.lookup("account", "a") is loc  # one Location per customer, shared
    assert idx.lookup("did", "999") is None

    idx.put(cust("1", "account:a", "did:200", system="target", state="locked"))
    assert idx.lookup("did", "100") is None
    loc = idx.lookup_key("did:200")
    assert loc is not None and (loc.system, loc.state) == ("target", "locked")
    assert idx.owner("account:a") == "1"

    idx.remove("1")
    assert idx.lookup("account", "a") is None and idx.customer("1") is None and len(idx) == 0


def test_identity_moves_to_its_new_owner() -> None:
    idx = MemoryIndex()
    idx.put(cust("1", "account:a", "did:100"))
    idx.put(cust("2", "did:100"))
    assert idx.owner("did:100") == "2"
    c1 = idx.customer("1")
    assert c1 is not None and c1.identities == ("account:a",)
    idx.remove("1")  # must not drop the key now owned by 2
    assert idx.owner("did:100") == "2"


def test_build_from_joined_rows() -> None:
    rows = [
        ("1", "source", "active", "g", "", 0, "account:a"),
        ("1", "source", "active", "g", "", 0, "did:100"),
        ("2", "target", "locked", "", "b-x", 60, None),  # a customer without identities
        ("3", "target", "active", "g", "b-x", 0, "account:c"),
    ]
    idx = MemoryIndex.build(rows)
    assert idx.customer_count == 3 and len(idx) == 3
    c2 = idx.customer("2")
    assert c2 is not None and (c2.state, c2.expires_cap, c2.identities) == ("locked", 60, ())
    c1, c3 = idx.customer("1"), idx.customer("3")
    assert c1 is not None and c3 is not None and c1.group is c3.group  # shared copies


@pytest.mark.parametrize("policy", ["source", "target", "reject"])
def test_decide_applies_the_unknown_policy(policy: str) -> None:
    s = open_store("sqlite:///:memory:", policy)
    s.put_customer("9", ["did:555"], "target")
    d = s.decide("did", "555")
    assert (d.system, d.customer_id) == ("target", "9")
    d = s.decide("did", "556")
    assert (d.system, d.customer_id) == (policy, "")
    assert "unknown" in d.reason


def test_lookup_benchmark(benchmark) -> None:  # type: ignore[no-untyped-def]
    """pytest-benchmark reports the lookup time; no threshold (see memory.py's perf note)."""
    idx = MemoryIndex.build(
        (str(i), "source", "active", "", "", 0, f"did:1555{i:07d}") for i in range(100_000)
    )
    assert benchmark(idx.lookup, "did", "15550054321") is not None


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.slow
def test_one_million_identities_memory() -> None:
    """Prints RSS per identity for 1M identities (250k customers x 4); bound is generous."""
    gc.collect()
    before = _rss_mb()

    def rows():  # type: ignore[no-untyped-def]
        for i in range(250_000):
            cid = str(100000 + i)
            for key in (f"account:a{i}", f"did:1555{i:07d}", f"i_account:{i}", f"login:user{i}@x"):
                yield (cid, "source", "active", "", "", 0, key)

    idx = MemoryIndex.build(rows())
    gc.collect()
    used = _rss_mb() - before
    print(f"1M identities: {used:.0f} MB RSS, {used * 1048576 / len(idx):.0f} B/identity")
    assert len(idx) == 1_000_000
    assert used < 600
