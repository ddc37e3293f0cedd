"""Start and stop peer programs so that none outlives the test that started it.

Each program runs in its own session (process group): stop() signals the whole group, so
Kamailio's forked workers and any helper children go too. On Linux a child started from the
main thread also gets PR_SET_PDEATHSIG, so it dies with pytest even on SIGKILL. A program
that forks workers (Kamailio) runs under a small guard (guard=True) that kills the whole
group when pytest dies, since PDEATHSIG does not reach grandchildren. An atexit hook stops
whatever is left on a normal interpreter exit.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Self

__all__ = ["PeerError", "PeerProcess", "find_binary", "scratch_dir", "tail"]

_PR_SET_PDEATHSIG = 1
_live: weakref.WeakSet[PeerProcess] = weakref.WeakSet()


# The guard: the group's leader, parent of the real program. It ignores the signals stop()
# sends to the group (the program gets them too) and exits with the program's status; when
# pytest dies it gets SIGUSR2 (PDEATHSIG) and SIGKILLs the group.
_GUARD = r"""
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGUSR2)
if os.getppid() == 1:
    sys.exit(70)
child = os.fork()
if child == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
signal.signal(signal.SIGUSR2, lambda *_: os.killpg(0, signal.SIGKILL))
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
    signal.signal(sig, lambda *_: None)
while True:
    try:
        _, status = os.waitpid(child, 0)
        break
    except InterruptedError:
        continue
if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
sys.exit(os.waitstatus_to_exitcode(status))
"""


class PeerError(RuntimeError):
    """A peer program failed to start, answer or stop; the message carries its log tail."""


def find_binary(name: str) -> str | None:
    """Full path of a program: PATH first, then the sbin directories that a non-root PATH
    often lacks (Debian puts kamailio in /usr/sbin)."""
    found = shutil.which(name)
    if found is None and "/" not in name:
        found = shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    return found


def tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class PeerProcess:
    """One peer program: argv, a log file for its stdout+stderr, group-wide stop."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str | Path],
        log_path: Path,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        pipes: bool = False,
        stdout_path: Path | None = None,
        guard: bool = False,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.pipes = pipes  # stdin/stdout as pipes (a control channel); stderr to the log
        self.stdout_path = stdout_path  # stdout to its own file instead of the log
        self.guard = guard and Path("/proc").is_dir()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._out: IO[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        if self.proc is not None:
            raise PeerError(f"{self.name}: already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (lives until stop)
        self._log.write(f"### {self.name}: {' '.join(self.argv)}\n".encode())
        self._log.flush()
        stdout: Any = self._log
        if self.pipes:
            stdout = subprocess.PIPE
        elif self.stdout_path is not None:
            stdout = self._out = open(self.stdout_path, "ab")  # noqa: SIM115
        main = threading.current_thread() is threading.main_thread()
        kwargs: dict[str, Any] = {}
        if main and os.name == "posix" and Path("/proc").is_dir():
            # PDEATHSIG fires when the *thread* that forked exits, so only from main.
            kwargs["preexec_fn"] = _pdeathsig
        try:
            argv = self.argv
            if self.guard and main:
                argv = [sys.executable, "-I", "-S", "-c", _GUARD, *argv]
            self.proc = subprocess.Popen(
                argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.PIPE if self.pipes else subprocess.DEVNULL,
                stdout=stdout,
                stderr=self._log,
                start_new_session=True,
                **kwargs,
            )
        except OSError as exc:
            self._close_files()
            raise PeerError(f"{self.name}: cannot start {self.argv[0]}: {exc}") from exc
        _live.add(self)

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise PeerError(f"{self.name}: not started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait(self, timeout: float) -> int | None:
        """Wait for the program to exit by itself; None if it is still running."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig: int) -> None:
        """Send a signal to the program's whole process group."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float = 3.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the group, wait `grace` seconds, then SIGKILL whatever is left.

        Returns the exit status of the main process (negative: killed by that signal).
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.send_signal(sig)
            self.wait(grace)
        # The leader may be gone while forked workers linger: sweep the group anyway.
        self.send_signal(signal.SIGKILL)
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired as exc:
            raise PeerError(f"{self.name}: pid {self.proc.pid} survives SIGKILL") from exc
        self._reap_group(2.0)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass  # its unsent input: the process is gone, nobody will read it
        self._close_files()
        _live.discard(self)
        return self.proc.returncode

    def _close_files(self) -> None:
        for f in (self._log, self._out):
            if f is not None:
                f.close()
        self._log = self._out = None

    def _reap_group(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def log_tail(self, lines: int = 40) -> str:
        if self._log is not None:
            self._log.flush()
        return tail(self.log_path, lines)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    """Does any process of the group still run? Zombies do not count: when the leader is
    killed first its workers are re-parented, and a container's init may never reap them."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces, split after ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


_scratch_root: Path | None = None


def scratch_dir(prefix: str) -> Path:
    """A fresh directory for a peer that was given no workdir. All of them live under one
    per-process root that is removed at interpreter exit, so logs stay readable until the
    end of the run and nothing piles up in /tmp."""
    global _scratch_root
    if _scratch_root is None:
        _scratch_root = Path(tempfile.mkdtemp(prefix=f"dsbc-peers-{os.getpid()}-"))
        atexit.register(shutil.rmtree, _scratch_root, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_scratch_root))


@atexit.register
def _stop_leftovers() -> None:
    for p in list(_live):
        try:
            p.stop(grace=0.5)
        except PeerError:
            pass
