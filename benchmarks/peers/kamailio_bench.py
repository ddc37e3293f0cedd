"""Kamailio as the peer of the SIP benchmarks (config: kamailio_bench.cfg.tmpl).

with KamailioBench(workdir, "127.0.0.1", source=("127.0.0.3", 5070),
                   target=("127.0.0.4", 5070), customers=250_000, tcp=False) as k:
    k.addr, k.pid          # where to send, whose process tree to measure
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Self

from tests.peers.kamailio import MODULES_DIR
from tests.peers.net import free_port, sip_options
from tests.peers.proc import PeerError, PeerProcess, find_binary

TEMPLATE = Path(__file__).with_name("kamailio_bench.cfg.tmpl")


class KamailioBench:
    def __init__(
        self,
        workdir: Path,
        ip: str,
        *,
        source: tuple[str, int],
        target: tuple[str, int],
        customers: int,
        tcp: bool = False,
        children: int = 1,
        port: int | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.ip = ip
        self.port = port or free_port("both" if tcp else "udp", ip)
        self.source = source
        self.target = target
        self.customers = customers
        self.tcp = tcp
        self.children = children
        self.start_timeout = start_timeout
        self.proc: PeerProcess | None = None
        self.rundir: Path | None = None

    @property
    def addr(self) -> tuple[str, int]:
        return self.ip, self.port

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "kamailio.log"

    def render(self) -> str:
        assert self.rundir is not None
        listen = [f"listen=udp:{self.ip}:{self.port}"]
        if self.tcp:
            listen.append(f"listen=tcp:{self.ip}:{self.port}")
        subst = {
            "CHILDREN": str(self.children),
            "TCP_DISABLE": "" if self.tcp else "disable_tcp=yes",
            "RUNDIR": str(self.rundir),
            "LISTEN": "\n".join(listen),
            "MPATH": MODULES_DIR,
            "MAX_LOOPS": str(self.customers + 10),
            "CUSTOMERS": str(self.customers),
            "SOURCE": f"sip:{self.source[0]}:{self.source[1]}",
            "TARGET": f"sip:{self.target[0]}:{self.target[1]}",
        }
        text = TEMPLATE.read_text()
        for k, v in subst.items():
            text = text.replace(f"@@{k}@@", v)
        if "@@" in text:
            raise PeerError("kamailio_bench template: a placeholder is left")
        return text

    def start(self) -> Self:
        binary = find_binary("kamailio")
        if binary is None:
            raise PeerError("kamailio not found")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rundir = Path(tempfile.mkdtemp(prefix=f"kb{os.getpid()}-", dir="/tmp"))
        cfg = self.workdir / "kamailio.cfg"
        cfg.write_text(self.render())
        # shm: 1M htable cells (~110 B each) and TCP buffers of 1,000 connections
        argv = [
            binary,
            "-DD",
            "-E",
            "-f",
            str(cfg),
            "-m",
            "512",
            "-M",
            "16",
            "-Y",
            str(self.rundir),
            "-P",
            str(self.rundir / "k.pid"),
            "-w",
            str(self.workdir),
            "-a",
            "no",
        ]
        self.proc = PeerProcess("kamailio-bench", argv, self.log_path, guard=True)
        self.proc.start()
        deadline = time.monotonic() + self.start_timeout
        while True:
            if not self.proc.alive():
                raise PeerError(f"kamailio-bench exited at start:\n{self.proc.log_tail()}")
            if "BENCH-LOADED" in self.log_path.read_text(errors="replace") and sip_options(
                *self.addr, "udp", 0.3
            ):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise PeerError(f"kamailio-bench not ready after {self.start_timeout:.0f}s")
            time.sleep(0.2)

    def loaded(self) -> int:
        """How many identities the htable holds (from the start-up log line)."""
        for line in self.log_path.read_text(errors="replace").splitlines():
            if "BENCH-LOADED" in line:
                return int(line.rsplit("BENCH-LOADED", 1)[1].split()[0])
        return 0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=3.0)
            self.proc = None
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
