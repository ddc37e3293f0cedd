"""Shared parts of the fuzz harnesses: the invariants, the seed corpus and a runner that
uses atheris (libFuzzer) when it is installed and a bounded mutation loop otherwise.

The harness scripts import ``sip`` under ``atheris.instrument_imports()`` (``_harness.start``)
*before* this module, so the coverage instrumentation sees the codec, not this glue.
tests/test_sip_codec.py and tests/test_framing.py run the same invariants under Hypothesis.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import pathlib
import random
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from typing import Any

from sip.errors import SipError
from sip.framing import NEED_DATA, PING, StreamFramer
from sip.message import Editor, SipMessage, make_response, parse_message

HERE = pathlib.Path(__file__).resolve().parent
SEED_DIR = HERE / "corpus"
MAX_STREAM = 4000  # the framing harness uses a small max_size so MessageTooLarge is reachable


# --- invariants ---------------------------------------------------------------------------


def exercise(msg: SipMessage) -> None:
    """Every accessor works or raises SipError; editing and answering never fail."""
    for attr in (
        "vias",
        "from_",
        "to",
        "cseq",
        "max_forwards",
        "routes",
        "uri",
        "from_tag",
        "to_tag",
    ):
        try:
            getattr(msg, attr)
        except SipError:
            pass
    for h in msg.headers:
        try:
            msg.values(h.name)
        except SipError:
            pass
    assert msg.body == msg.raw[msg.body_start :]
    unedited = Editor(msg).to_bytes()
    if msg.get("content-length") is not None and msg.raw[: msg.body_start].endswith(
        (b"\r\n\r\n", b"\n\n")
    ):
        # a parsed message with Content-Length and its empty line is reproduced exactly
        assert unedited == msg.raw, "Editor without edits changed the message"
    e = Editor(msg)
    e.prepend("via", "SIP/2.0/UDP 198.51.100.1;branch=z9hG4bKfuzz")
    try:
        e.set_first_value("via", None)
    except (SipError, ValueError):
        pass
    e.body = b"x"
    out = e.to_bytes()
    assert out.endswith((b"\r\n\r\nx", b"\n\nx", b"\n\r\nx"))
    if msg.is_request:
        make_response(msg, 200, "OK", to_tag="t")


def check_parse(data: bytes) -> None:
    """h11's invariant for SIP: any octets parse or raise SipError, nothing else."""
    for datagram in (True, False):
        try:
            msg = parse_message(data, datagram=datagram)
        except SipError as exc:
            partial = getattr(exc, "partial", None)
            if partial is not None:
                assert partial.is_request and exc.respond
                assert partial.count("via"), "a partial must have a Via to answer on"
                make_response(partial, exc.status, exc.reason, to_tag="t")
            continue
        exercise(msg)


def framing_events(
    chunks: list[bytes], max_size: int = MAX_STREAM
) -> tuple[list[object], str | None, int]:
    """Feed ``chunks`` to a StreamFramer: (its events, the name of its SipError or None,
    the octets it still holds, -1 after an error)."""
    f = StreamFramer(max_size=max_size)
    out: list[object] = []
    try:
        for c in chunks:
            f.receive_data(c)
            for _ in range(len(c) + 2):  # each event consumes input: bounded
                ev = f.next_event()
                if ev is NEED_DATA:
                    break
                assert ev is PING or isinstance(ev, bytes), ev
                out.append(ev)
            else:
                raise AssertionError("StreamFramer never returned NEED_DATA")
    except SipError as exc:
        return out, type(exc).__name__, -1
    return out, None, f.buffered


def check_framing(data: bytes) -> None:
    """Any stream gives events or SipError; cutting it differently changes nothing."""
    whole = framing_events([data])
    rnd = random.Random(zlib.crc32(data))
    cuts = sorted(rnd.sample(range(len(data) + 1), min(len(data) + 1, rnd.randint(0, 12))))
    bounds = [0, *cuts, len(data)]
    chunked = framing_events([data[a:b] for a, b in itertools.pairwise(bounds)])
    assert chunked == whole, "random cuts changed the framing"
    if len(data) <= 1500:
        assert framing_events([bytes([b]) for b in data]) == whole, (
            "byte-by-byte feeding changed the framing"
        )
    for ev in whole[0]:
        if isinstance(ev, bytes):
            assert len(ev) <= MAX_STREAM
            try:
                exercise(parse_message(ev, datagram=False, max_size=MAX_STREAM))
            except SipError:
                pass


# --- fallback mutation loop ----------------------------------------------------------------

TOKENS = [
    b"\r\n", b"\n", b"\r", b" ", b"\t", b",", b";", b":", b"<", b">", b'"', b"\\", b"@", b"=",
    b"%", b"%00", b"\xb2", b"\x00", b"\xff", b"\xc3\xa9", b"SIP/2.0", b"SIP/2.0/UDP ", b"v:",
    b"l: 5", b"Content-Length: 0", b"\r\n\r\n", b"\r\n ", b"[", b"]", b"?", b"9" * 12,
    b"9" * 5000, b"sip:", b"tel:", b"branch=z9hG4bK",
]  # fmt: skip


def mutate(rnd: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 8)):
        op = rnd.randrange(7)
        i = rnd.randint(0, len(buf))
        if op == 0:
            buf[i:i] = rnd.choice(TOKENS)
        elif op == 1:
            del buf[i : i + rnd.randint(1, 16)]
        elif op == 2 and buf:
            buf[min(i, len(buf) - 1)] = rnd.randrange(256)
        elif op == 3:
            j = rnd.randint(0, len(buf))
            buf[i:i] = buf[j : j + rnd.randint(1, 40)]
        elif op == 4:
            other = rnd.choice(seeds)
            buf[i:] = other[rnd.randint(0, len(other)) :]  # splice
        elif op == 5:
            buf[i:i] = rnd.choice(seeds) + rnd.choice([b"", b"\r\n\r\n"])  # stream of two
        else:
            buf[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
    return bytes(buf[:20000])


def load_seeds(dirs: list[str]) -> list[bytes]:
    seeds: dict[bytes, None] = {}  # ordered, without duplicates
    for d in [*(pathlib.Path(p) for p in dirs), SEED_DIR]:
        if d.is_file():
            seeds[d.read_bytes()] = None
        elif d.is_dir():
            seeds.update((p.read_bytes(), None) for p in sorted(d.iterdir()) if p.is_file())
    return list(seeds) or [b""]


def _flag(argv: list[str], name: str, default: int) -> int:
    for a in argv:
        if a.startswith(f"-{name}="):
            return int(a.split("=", 1)[1])
    return default


def fallback_loop(test: Callable[[bytes], None], argv: list[str]) -> int:
    """Bounded in count (-runs=N, default 100000) and time (-max_total_time=S, default 60)."""
    runs = _flag(argv, "runs", 100_000)
    max_time = _flag(argv, "max_total_time", 60)
    seed = _flag(argv, "seed", int.from_bytes(os.urandom(4), "big"))
    prefix = next((a.split("=", 1)[1] for a in argv if a.startswith("-artifact_prefix=")), "./")
    seeds = load_seeds([a for a in argv[1:] if not a.startswith("-")])
    rnd = random.Random(seed)
    deadline = time.monotonic() + max_time
    done = 0
    print(f"fallback fuzzing (atheris not in use): seed={seed} seeds={len(seeds)}", file=sys.stderr)
    for data in seeds:
        _run_one(test, data, prefix)
    while done < runs and time.monotonic() < deadline:
        data = mutate(rnd, rnd.choice(seeds), seeds)
        _run_one(test, data, prefix)
        done += 1
    print(f"fallback fuzzing done: {done} mutated inputs, no failure", file=sys.stderr)
    return 0


def _run_one(test: Callable[[bytes], None], data: bytes, prefix: str) -> None:
    try:
        test(data)
    except BaseException:
        path = f"{prefix}crash-{hashlib.sha1(data).hexdigest()}"
        pathlib.Path(path).write_bytes(data)
        print(f"failing input written to {path}", file=sys.stderr)
        raise


def main(test: Callable[[bytes], None], atheris: Any) -> int:
    argv = [a for a in sys.argv if a != "--no-atheris"]
    if atheris is None or "--no-atheris" in sys.argv:
        return fallback_loop(test, argv)
    if not any(a.startswith("-max_len=") for a in argv):
        argv.append("-max_len=12000")  # above MAX_STREAM, so oversized messages get tried
    if not any(not a.startswith("-") for a in argv[1:]):
        # no corpus dir given: new inputs go to a temp dir, seeds are read from corpus/
        argv += [tempfile.mkdtemp(prefix="sip-fuzz-"), str(SEED_DIR)]
    atheris.Setup(argv, test)
    atheris.Fuzz()
    return 0
