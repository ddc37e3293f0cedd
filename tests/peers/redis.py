"""redis-server as a peer: a private instance on a free loopback port.

    with RedisServer(tmp_path / "redis") as r:
        r.url                 # "redis://127.0.0.1:PORT/0"
        r.stop(); r.start()   # a restart keeps the data (appendonly yes, same directory)
        r.client()            # a redis-py client (decode_responses=True)

The data directory holds the append-only file and the log; `restart()` is stop + start
on the same port, so clients that reconnect find the same server again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Self

from tests.peers.net import free_port, wait_port, wait_port_closed
from tests.peers.proc import PeerError, PeerProcess, find_binary, scratch_dir

__all__ = ["RedisServer", "TcpProxy"]


class RedisServer:
    def __init__(
        self,
        workdir: Path | None = None,
        *,
        port: int | None = None,
        ip: str = "127.0.0.1",
        appendfsync: str = "always",
        binary: str = "redis-server",
    ) -> None:
        found = find_binary(binary)
        if found is None:
            raise PeerError(f"{binary} not found (apt-get install redis-server)")
        self.binary = found
        self.ip = ip
        self.port = port or free_port("tcp", ip)
        self.workdir = Path(workdir) if workdir is not None else scratch_dir("redis-")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.appendfsync = appendfsync
        self.log_path = self.workdir / "redis.log"
        self.proc: PeerProcess | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://{self.ip}:{self.port}/0"

    @property
    def addr(self) -> tuple[str, int]:
        return self.ip, self.port

    def start(self, timeout: float = 10.0) -> Self:
        if self.proc is not None:
            raise PeerError("redis-server: already running")
        argv = [
            self.binary,
            "--bind", self.ip,
            "--port", str(self.port),
            "--dir", str(self.workdir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--logfile", "",
            "--databases", "4",
        ]  # fmt: skip
        self.proc = PeerProcess(f"redis-{self.port}", argv, self.log_path, cwd=self.workdir)
        self.proc.start()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if not self.proc.alive():
                log = self.proc.log_tail()
                self.proc.stop()
                self.proc = None
                raise PeerError(f"redis-server exited at start:\n{log}")
            try:
                wait_port(self.ip, self.port, "tcp", timeout=0.1)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise PeerError(f"redis-server did not listen on {self.port}") from None
        # listening is not loaded: PING answers LOADING while the AOF is replayed
        c = self.client()
        while True:
            try:
                if c.ping():
                    break
            except Exception as exc:  # noqa: BLE001 - redis.BusyLoadingError and friends
                if time.monotonic() > deadline:
                    raise PeerError(f"redis-server not ready: {exc}") from None
                time.sleep(0.05)
        c.close()
        return self

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        code = self.proc.stop(grace=5.0)
        self.proc = None
        try:
            wait_port_closed(self.ip, self.port, "tcp", timeout=5.0)
        except TimeoutError:
            pass
        return code

    def restart(self) -> Self:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def client(self, **kwargs: Any) -> Any:
        import redis

        kwargs.setdefault("decode_responses", True)
        kwargs.setdefault("socket_timeout", 5.0)
        return redis.Redis(host=self.ip, port=self.port, db=0, **kwargs)

    def log_tail(self, lines: int = 40) -> str:
        return self.proc.log_tail(lines) if self.proc is not None else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TcpProxy:
    """A TCP relay on a free loopback port in front of `upstream`, for network faults:
    `cut()` drops every connection and refuses new ones (a partition), `heal()` undoes it,
    `stall()` keeps connections open but forwards nothing (a hung server)."""

    def __init__(self, upstream: tuple[str, int], ip: str = "127.0.0.1") -> None:
        import socket
        import threading

        self.upstream = upstream
        self.ip = ip
        self.port = free_port("tcp", ip)
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind((ip, self.port))
        self._lsock.listen(64)
        self._lsock.settimeout(0.2)
        self._conns: list[Any] = []
        self._lock = threading.Lock()
        self.state = "open"  # open, cut, stalled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def addr(self) -> tuple[str, int]:
        return self.ip, self.port

    def url(self, db: int = 0) -> str:
        return f"redis://{self.ip}:{self.port}/{db}"

    def _accept(self) -> None:
        import socket
        import threading

        while not self._stop.is_set():
            try:
                client, _ = self._lsock.accept()
            except (TimeoutError, OSError):
                continue
            if self.state == "cut":
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=2.0)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: Any, dst: Any) -> None:
        try:
            src.settimeout(0.1)
        except OSError:  # cut() closed it before this thread started
            return
        while not self._stop.is_set():
            if self.state == "stalled":
                time.sleep(0.02)
                continue
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data or self.state == "cut":
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def _drop_all(self) -> None:
        import socket

        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def cut(self) -> None:
        self.state = "cut"
        self._drop_all()

    def stall(self) -> None:
        self.state = "stalled"

    def heal(self) -> None:
        if self.state == "stalled":
            self._drop_all()  # what was held back is stale: the clients reconnect
        self.state = "open"

    def close(self) -> None:
        self._stop.set()
        self._lsock.close()
        self._drop_all()
        self._thread.join(timeout=2.0)
