"""A SIP flood from one source address: a paced raw UDP loop in its own process.

    with Flood(("127.0.0.1", 5060), count=50_000, seconds=5.0, local_ip="127.0.0.9") as f:
        ...                      # the flood runs while the test does its legitimate calls
    f.result                     # {"sent": 50000, "elapsed": 5.01, "answers": 812, ...}

Run as ``python -m tests.peers.flood HOST:PORT --count N --seconds S --from IP`` it prints
one JSON line with what it did.  Each INVITE is a valid request with its own Call-ID and
branch (so nothing downstream could treat the copies as retransmissions); the loop is
paced in small bursts so the whole flood lasts ``seconds``, bounded in count and time.
Answers are read (and counted by status) without ever blocking the send loop.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[2]

TEMPLATE = (
    "INVITE sip:{callee}@{host}:{port} SIP/2.0\r\n"
    "Via: SIP/2.0/UDP {lip}:{lport};branch=z9hG4bK-fl{n};rport\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:flooder@{lip}>;tag=fl{n}\r\n"
    "To: <sip:{callee}@{host}>\r\n"
    "Call-ID: flood-{n}@{lip}\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:flooder@{lip}:{lport}>\r\n"
    "User-Agent: {ua}\r\n"
    "Content-Length: 0\r\n\r\n"
)


def flood(
    target: tuple[str, int],
    count: int,
    seconds: float,
    local_ip: str,
    callee: str = "1002",
    ua: str = "flooder",
) -> dict[str, Any]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((local_ip, 0))
    sock.setblocking(False)
    lip, lport = sock.getsockname()
    host, port = target
    # fast formatting: only the counter changes between two INVITEs
    base = TEMPLATE.format(callee=callee, host=host, port=port, lip=lip, lport=lport, ua=ua, n="\0")
    parts = base.encode().split(b"\0")
    answers: dict[str, int] = {}
    sent = errors = 0
    burst = 50
    start = time.monotonic()
    deadline = start + seconds * 3 + 5  # never run much past the plan, whatever happens
    while sent < count and time.monotonic() < deadline:
        n = min(burst, count - sent)
        for i in range(sent, sent + n):
            try:
                sock.sendto(str(i).encode().join(parts), target)
            except BlockingIOError:
                errors += 1
            except OSError:
                errors += 1
        sent += n
        _drain(sock, answers)
        ahead = start + seconds * sent / count - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    elapsed = time.monotonic() - start
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        _drain(sock, answers)
        time.sleep(0.05)
    sock.close()
    return {
        "sent": sent,
        "send_errors": errors,
        "elapsed": round(elapsed, 3),
        "rate": round(sent / elapsed),
        "answers": answers,
    }


def _drain(sock: socket.socket, answers: dict[str, int]) -> None:
    for _ in range(1000):
        try:
            data = sock.recv(65535)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        status = data[8:11].decode("ascii", "replace") if data.startswith(b"SIP/2.0 ") else "other"
        answers[status] = answers.get(status, 0) + 1


class Flood:
    """The flood in a subprocess, so it has a core of its own and cannot stall the test."""

    def __init__(
        self,
        target: tuple[str, int],
        count: int,
        seconds: float,
        local_ip: str = "127.0.0.9",
        **kw: str,
    ) -> None:
        self.argv = [sys.executable, "-m", "tests.peers.flood", f"{target[0]}:{target[1]}", "--count", str(count),
                     "--seconds", str(seconds), "--from", local_ip]  # fmt: skip
        for k, v in kw.items():
            self.argv += [f"--{k}", v]
        self.seconds = seconds
        self.proc: subprocess.Popen[str] | None = None
        self.result: dict[str, Any] = {}

    def start(self) -> Self:
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return self

    def wait(self) -> dict[str, Any]:
        assert self.proc is not None
        try:
            out, err = self.proc.communicate(timeout=self.seconds * 3 + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        if self.proc.returncode != 0:
            raise RuntimeError(f"flood failed ({self.proc.returncode}): {err[-2000:]}")
        self.result = json.loads(out.strip().splitlines()[-1])
        return self.result

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None and exc[0] is not None:
            self.proc.kill()
        if self.proc is not None and not self.result and exc[0] is None:
            self.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", help="HOST:PORT")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--from", dest="local_ip", default="127.0.0.9")
    ap.add_argument("--callee", default="1002")
    ap.add_argument("--ua", default="flooder")
    a = ap.parse_args()
    host, _, port = a.target.rpartition(":")
    res = flood((host, int(port)), a.count, a.seconds, a.local_ip, a.callee, a.ua)
    sys.stdout.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
