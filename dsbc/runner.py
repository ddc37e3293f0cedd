"""`dsbc run`: a master process and N worker processes sharing the listening ports.

The master forks the workers, restarts one that dies, drains them on SIGTERM / SIGINT and
on SIGHUP re-reads the configuration (refusing a bad one, keeping the old workers) and
replaces the workers one by one, so traffic is never dropped: SO_REUSEPORT lets the new
worker listen before the old one stops.

Each worker runs one uvloop event loop with the SIP dispatcher and, in worker 0, the
services that listen on one port only (API, RADIUS, Diameter, control API).  Every worker
polls the store for committed changes every ``store.poll_interval`` seconds and writes a
status snapshot into the run directory, where the control API sums them up.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from .config import Config, ConfigError, api_wanted, config_error, key_text, load_config
from .preflight import preflight
from .store import StoreError

log = logging.getLogger("dsbc")


def _address_in_use(exc: OSError) -> bool:
    """EADDRINUSE, also as uvloop raises it for a UDP endpoint: an OSError without errno
    ("could not bind to local_addr") whose cause carries it."""
    cause = exc.__cause__
    return exc.errno == errno.EADDRINUSE or (
        isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE)

DRAIN_SECONDS = 5.0
RELEASE_INTERVAL = 2.0  # s between checks for the locks of a dead migration (worker 0)


def setup_logging(level: str = "info", as_json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        class _Json(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                       "pid": record.process, "msg": record.getMessage()}
                if record.exc_info:  # log.exception(): the traceback too, in the same line
                    out["exc"] = self.formatException(record.exc_info)
                return json.dumps(out)
        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def run_dir_for(pid: int) -> Path:
    return Path(os.environ.get("DSBC_RUN_DIR") or Path(tempfile.gettempdir()) / f"dsbc-{pid}")


# --- worker ----------------------------------------------------------------------------------


class Worker:
    def __init__(self, cfg: Config, index: int, run_dir: Path, run_id: str) -> None:
        self.cfg = cfg
        self.index = index
        self.run_dir = run_dir
        self.run_id = run_id
        self.services: dict[str, Any] = {}
        self.store: Any = None
        self.stopping = asyncio.Event()
        self.master = os.getppid()  # forked by the master
        self.started = time.time()  # with the pid, names this process in the snapshots

    def ipc_name(self, worker: int) -> str:
        return f"\0dsbc-{self.run_id}-{worker}"

    async def main(self) -> None:
        from .store import open_store

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the master handles reloads
        self.store = open_store(self.cfg.store.url, self.cfg.store.unknown, cache_file=self.cfg.store.cache_file)
        if self.index == 0:
            # the control API first, before "loaded": on a reload both workers listen on its
            # port (SO_REUSEPORT) until the replaced one closes its listener as it drains, so
            # /healthz never goes unanswered (keepalived would give the address away); its
            # snapshots say when this worker's SIP is up
            await self._start_optional("control", "dsbc.control", "start_control", self.cfg.control.enabled)
            # the API too (SO_REUSEPORT, no state of its own in the worker): API clients
            # never find the port closed while the replaced worker drains
            await self._start_optional("api", "dsbc.api_service", "start_api", api_wanted(self.cfg))
        # loaded: on a reload the master now drains the worker this one replaces, which
        # frees its IPC name at once; until then both serve (SO_REUSEPORT)
        (self.run_dir / f"loaded-{self.index}-{os.getpid()}").touch()
        if self.cfg.sip.enabled:
            from .sip_service import SipService

            sip = SipService(self.cfg, self.store, self.index, self.ipc_name)
            await self._wait_ipc_name()
            await self._start_ipc_bind_retry(sip)
            self.services["sip"] = sip
        if self.index == 0:
            # Diameter first: a replaced worker stops its services in the reverse order, so
            # its RADIUS ports are free before its Diameter stop waits for this worker to
            # listen (its clients, told to reconnect, must find the port open)
            await self._start_optional("diameter", "dsbc.diameter.service", "start_diameter", self.cfg.diameter.enabled)
            await self._start_optional("radius", "dsbc.radius.service", "start_radius", self.cfg.radius.enabled)
        control = self.services.get("control")
        if control is not None:  # its writes are applied by it, not by _refresh
            control.on_changed = self._customers_changed
        tasks = [loop.create_task(self._refresh()), loop.create_task(self._watch_master())]
        if self.index == 0:
            tasks.append(loop.create_task(self._release_expired_locks()))
        tasks.append(loop.create_task(self._snapshot()))  # the snapshots last: until the services stop
        log.info("worker %d ready: %s", self.index, ", ".join(self.services) or "no services")
        (self.run_dir / f"ready-{self.index}-{os.getpid()}").touch()
        await self.stopping.wait()
        log.info("worker %d draining", self.index)
        # a reload: the master made a successor for this worker, which takes over its ports
        replaced = (self.run_dir / f"replaced-{os.getpid()}").exists()
        for svc in self.services.values():
            if hasattr(svc, "handover"):
                svc.handover = replaced
        for svc in self.services.values():  # stop taking new work (SIP, control API)
            drain = getattr(svc, "drain", None)
            if drain is not None:
                drain()
        draining: Any = self.services.get("sip")
        if draining is not None:
            self._release_ipc_name(draining)
        # what every service holds for a migration is released (or refused) as the store
        # says: the store keeps being read until then
        deadline = loop.time() + DRAIN_SECONDS
        while self._held_count() and loop.time() < deadline:
            await asyncio.sleep(0.1)
        if draining is not None:
            await asyncio.sleep(0.2)
        for t in tasks[:-1]:
            t.cancel()
        for name, svc in reversed(list(self.services.items())):
            try:
                await svc.stop()
            except Exception:
                log.exception("stopping %s", name)
        tasks[-1].cancel()
        self._write_snapshot()  # the last counters: the master folds them in when this one exits
        self.store.close()

    async def _wait_ipc_name(self, timeout: float = DRAIN_SECONDS + 5) -> None:
        """Wait until the worker this one replaces (a reload) has let go of the IPC name, so
        that the listeners are bound once and for good (binding and closing them while
        retrying would drop what the kernel hands them meanwhile)."""
        import socket

        deadline = time.monotonic() + timeout
        while True:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                probe.bind(self.ipc_name(self.index))
                return
            except OSError:
                if time.monotonic() > deadline:
                    return  # _start_ipc_bind_retry reports it
            finally:
                probe.close()
            await asyncio.sleep(0.02)

    def _held_count(self) -> int:
        """Requests the services hold for customers in flight (SIP, API, RADIUS, Diameter)."""
        return sum(int(getattr(svc, "held_count", 0)) for svc in self.services.values())

    @staticmethod
    def _release_ipc_name(sip: Any) -> None:
        """A draining worker frees its IPC name for its successor; connections it still
        holds can no longer be handed a message by other workers (they close at the end of
        the drain anyway).  It keeps an unnamed socket to hand messages to the other
        workers' connections: it serves UDP until it has released what it holds."""
        import socket

        endpoint = getattr(sip, "endpoint", None)
        ipc = getattr(endpoint, "_ipc", None)
        if endpoint is None or ipc is None:
            return
        try:
            endpoint.loop.remove_reader(ipc.fileno())
            ipc.close()
        except (OSError, ValueError):
            pass
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.setblocking(False)
        endpoint._ipc = sender

    async def _start_ipc_bind_retry(self, sip: Any) -> None:
        for attempt in range(50):
            try:
                await sip.start()
                return
            except OSError as exc:
                if "Address already in use" not in str(exc) or attempt == 49:
                    raise
                await sip.stop()
                await asyncio.sleep(0.1)

    async def _start_optional(self, name: str, module: str, func: str, enabled: bool) -> None:
        if not enabled:
            return
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                log.warning("%s is enabled but %s is not available in this build", name, module)
                return
            raise
        # on a reload the worker being replaced holds these ports until its drain ends
        deadline = time.monotonic() + DRAIN_SECONDS + 5
        while True:
            try:
                self.services[name] = await getattr(mod, func)(self.cfg, self.store)
                return
            except OSError as exc:
                if not _address_in_use(exc) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.1)

    async def _refresh(self) -> None:
        """Apply store changes every poll_interval, and at once when the store says it has
        some (the Redis store's pub/sub thread calls `set_notify`'s callback)."""
        interval = self.cfg.store.poll_interval
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        set_notify = getattr(self.store, "set_notify", None)
        if set_notify is not None:
            set_notify(lambda: loop.call_soon_threadsafe(wake.set))
        while True:
            # perf: a timer that sets the event, not asyncio.wait_for (which wraps the wait
            # in a task of its own on every poll, 20 times a second)
            timer = loop.call_later(interval, wake.set)
            await wake.wait()
            timer.cancel()
            wake.clear()
            try:
                changed = self.store.refresh()
            except Exception as exc:  # noqa: BLE001 - the store may be away; serve from memory
                log.warning("store refresh failed: %s", exc)
                continue
            if changed:
                self._customers_changed(list(changed))

    def _customers_changed(self, ids: list[str]) -> None:
        """Tell every service (SIP, API, RADIUS, Diameter) which customers changed."""
        for svc in self.services.values():
            hook = getattr(svc, "customers_changed", None)
            if hook is not None:
                hook(ids)

    async def _release_expired_locks(self) -> None:
        """A migration killed between its lock and its flip (SIGKILL, a node that crashed
        while it ran one) cannot unlock its customers: once their lease has run out, worker 0
        of every node unlocks them where they are, so that their calls stop being held and
        refused "try again" (the next migration would release them too)."""
        while True:
            await asyncio.sleep(RELEASE_INTERVAL)
            try:
                released = await asyncio.to_thread(self.store.release_expired_locks)
            except Exception as exc:  # noqa: BLE001 - the store may be away: next time
                log.debug("releasing expired locks: %s", exc)
                continue
            for batch_id, n in released.items():
                log.warning("batch %s stopped without unlocking its customers: %d released where "
                            "they are when its lease (store.lock_lease %g s) ran out (dsbc rollback "
                            "%s moves back any it had moved)", batch_id, n, self.cfg.store.lock_lease,
                            batch_id)

    async def _watch_master(self) -> None:
        """A master killed with SIGKILL (or an OOM kill) cannot drain its workers: one left
        without it drains and exits, instead of serving on unsupervised (no restarts, no
        reloads, /healthz "ok") and holding the ports a new `dsbc run` needs."""
        while os.getppid() == self.master:
            await asyncio.sleep(1.0)
        log.error("worker %d: the master (pid %d) is gone: draining and exiting", self.index, self.master)
        self.stopping.set()

    async def _snapshot(self) -> None:
        while True:
            self._write_snapshot()
            await asyncio.sleep(1.0)

    def _write_snapshot(self) -> None:
        # one file per process: on a reload the replaced worker and its successor (same
        # index) both report until the old one exits and the master folds its counters in
        path = self.run_dir / f"worker-{self.index}-{os.getpid()}.json"
        services: dict[str, Any] = {}
        for name, svc in self.services.items():
            try:
                services[name] = svc.status()
            except Exception as exc:  # noqa: BLE001 - a status must not stop the snapshot
                services[name] = {"error": str(exc)}
        stats = getattr(self.store, "stats", None)
        try:
            store = stats() if stats is not None else {}
        except Exception as exc:  # noqa: BLE001 - nor a store that is closing
            store = {"reason": str(exc)}
        snap = {"worker": self.index, "pid": os.getpid(), "started": self.started, "ts": time.time(),
                "store_healthy": bool(getattr(self.store, "healthy", True)), "services": services,
                "store": store}
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(snap, default=str))
            tmp.replace(path)
        except OSError:
            pass


def worker_process(cfg: Config, index: int, run_dir: Path, run_id: str) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass
    setup_logging(cfg.log.level, cfg.log.json)
    try:
        asyncio.run(Worker(cfg, index, run_dir, run_id).main())
    except (OSError, ConfigError, StoreError) as exc:  # the master gives up after a few of these
        log.error("worker %d cannot start: %s", index, exc)
        os._exit(3)
    except Exception:
        log.exception("worker %d failed", index)
        os._exit(1)
    os._exit(0)


# --- master --------------------------------------------------------------------------------


def _warn_flow_secret_change(running: Config, new: Config) -> None:
    """A reload applies every key, but a new flow secret (sip.flow_secret, or the store's
    when it is "" and store.url changes) disowns the tokens dsbc wrote before: the Path of
    every registration and the Record-Route of every call in progress.  Say so."""
    if not (running.sip.enabled and new.sip.enabled):
        return
    if running.sip.flow_secret and running.sip.flow_secret in new.sip.flow_secret_previous:
        if running.sip.flow_secret != new.sip.flow_secret:
            log.info("reload: sip.flow_secret rotated; tokens signed with the previous one still "
                     "verify while it is listed in sip.flow_secret_previous")
        return
    if running.sip.flow_secret != new.sip.flow_secret or (
            not new.sip.flow_secret and running.store.url != new.store.url):
        log.warning("reload: sip.flow_secret changes (%s): the flow tokens of current registrations "
                    "and calls in progress no longer verify; requests toward those phones get 403 "
                    "until they register again and their calls end (list the old secret in "
                    "sip.flow_secret_previous to keep them valid)",
                    "store.url and with it the store's secret" if running.sip.flow_secret == new.sip.flow_secret
                    else "a new secret")


class Master:
    def __init__(self, cfg: Config, cfg_path: str) -> None:
        self.cfg = cfg
        self.cfg_path = cfg_path
        self.workers: dict[int, int] = {}  # index -> pid
        self.configs: dict[int, Config] = {}  # index -> the config it runs
        self.run_id = f"{os.getpid()}"
        self.run_dir = run_dir_for(os.getpid())
        self.flags: set[str] = set()
        self.start_failures = 0

    def spawn(self, index: int, cfg: Config | None = None) -> int:
        """Start worker ``index`` with ``cfg`` (the master's config by default); a restart
        keeps the config the index last ran (a reload that could not replace it)."""
        cfg = cfg or self.cfg
        pid = os.fork()
        if pid == 0:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            worker_process(cfg, index, self.run_dir, self.run_id)
        self.workers[index] = pid
        self.configs[index] = cfg
        return pid

    def run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from .metrics import RETIRED

        # a run directory a killed node left behind (DSBC_RUN_DIR): its counters are not ours
        for stale in [*self.run_dir.glob("worker-*.json"), self.run_dir / RETIRED]:
            stale.unlink(missing_ok=True)
        (self.run_dir / "master.json").write_text(json.dumps({"pid": os.getpid(), "config": self.cfg_path}))
        os.environ["DSBC_RUN_DIR"] = str(self.run_dir)
        signal.signal(signal.SIGTERM, lambda *_: self.flags.add("stop"))
        signal.signal(signal.SIGINT, lambda *_: self.flags.add("stop"))
        signal.signal(signal.SIGHUP, lambda *_: self.flags.add("reload"))
        for i in range(self.cfg.sip.workers):
            self.spawn(i)
        from sip._pure import build

        core = build()
        log.info("dsbc running with %d worker(s), config %s; SIP core and API fast path: %s%s",
                 len(self.workers), self.cfg_path, core,
                 " (about 2.5x slower: installed without a C compiler, or DSBC_PURE_PYTHON=1)"
                 if core == "pure Python" else "")
        while True:
            if "stop" in self.flags:
                code = self.stop()
                return 1 if "failed" in self.flags else code
            if "reload" in self.flags:
                self.flags.discard("reload")
                self.reload()
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid, status = 0, 0
            if pid:
                index = next((i for i, p in self.workers.items() if p == pid), None)
                started = bool(list(self.run_dir.glob(f"ready-*-{pid}")))
                self._forget(pid)
                if index is not None and "stop" not in self.flags:
                    code = os.waitstatus_to_exitcode(status)
                    if code == 3 or not started:
                        # died before it served (exit 3: it said why; other codes: a crash
                        # at start): a worker that never starts must not restart forever
                        self.start_failures += 1
                        if self.start_failures > 3:
                            log.error("workers cannot start (see above); giving up")
                            self.flags.update(("stop", "failed"))  # exit 1: systemd sees the failure
                            continue
                    else:
                        self.start_failures = 0  # it had served: a crash, not a start that fails
                    log.warning("worker %d (pid %d) exited with %s; restarting it", index, pid, code)
                    time.sleep(0.2)
                    self.spawn(index, self.configs.get(index))
                continue
            time.sleep(0.1)

    def _forget(self, pid: int) -> None:
        """Remove the marker files of a worker that is gone (one set per pid ever started
        would otherwise pile up until the stop), after folding the counters of its last
        snapshot into the run directory's retired ones (/metrics never goes back)."""
        self._retire(pid)
        for pattern in (f"loaded-*-{pid}", f"ready-*-{pid}", f"replaced-{pid}", f"worker-*-{pid}.json"):
            for p in self.run_dir.glob(pattern):
                try:
                    p.unlink()
                except OSError:
                    pass

    def _retire(self, pid: int) -> None:
        from .metrics import RETIRED, read_retired, retire

        for path in self.run_dir.glob(f"worker-*-{pid}.json"):
            try:
                snap = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(snap, dict):
                continue
            tmp = self.run_dir / f"{RETIRED}.tmp"
            try:  # written before the snapshot goes: a reader sees it in one or the other
                tmp.write_text(json.dumps(retire(read_retired(self.run_dir), snap)))
                tmp.replace(self.run_dir / RETIRED)
            except (OSError, ValueError, TypeError) as exc:
                log.warning("worker pid %d: its counters could not be kept: %s", pid, exc)

    def reload(self) -> None:
        try:
            # new certificate files, CA files, names...: all must work before any worker is replaced
            cfg = preflight(load_config(self.cfg_path))
            check_listeners_free(cfg, self.cfg)  # a new port another program holds
        except (ConfigError, click.ClickException) as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        if "stop" in self.flags:
            return  # SIGTERM came meanwhile: the stop replaces nothing
        if cfg.log != self.cfg.log:  # the master's own lines too: one format in the log
            setup_logging(cfg.log.level, cfg.log.json)
        log.info("reloading configuration from %s", self.cfg_path)
        _warn_flow_secret_change(self.cfg, cfg)
        running, self.cfg = self.cfg, cfg
        old, before = dict(self.workers), dict(self.configs)
        for index in [i for i in old if i >= cfg.sip.workers]:  # fewer workers: no replacement
            os.kill(self.workers.pop(index), signal.SIGTERM)
            self.configs.pop(index, None)
            del old[index]
        for index, pid in old.items():
            # the new worker first: once it has loaded the store, the old one drains (stops
            # listening, frees its IPC name, finishes what is held) and the new one binds
            # its listeners beside it (SO_REUSEPORT): no moment without a listener
            new = self.spawn(index)
            state = self._wait_file(f"loaded-{index}-{new}", new, 60.0)
            if state != "ok":
                self.workers[index], self.configs[index] = pid, before.get(index, running)
                if "stop" in self.flags:  # SIGTERM during the reload: the stop ends it
                    return
                log.error("reload: the new worker %d did not start; keeping the running ones", index)
                if state == "timeout":
                    os.kill(new, signal.SIGKILL)
                if index == min(old):  # no worker replaced yet: all still run the old config
                    self.cfg = running
                return
            try:  # tells the old worker's control API to hand over, not to report "draining"
                (self.run_dir / f"replaced-{pid}").touch()
            except OSError:
                pass
            os.kill(pid, signal.SIGTERM)
            state = self._wait_file(f"ready-{index}-{new}", new, DRAIN_SECONDS + 10)
            if state == "dead":
                # it loaded the new config, then died before it served (the old one has
                # drained): the index runs the running config again and the reload stops
                # there, as when a new worker cannot load; a crash loop would stop the node
                log.error("reload: the new worker %d exited before it served; it runs the "
                          "previous configuration again, and so do the workers not replaced yet",
                          index)
                self.spawn(index, before.get(index, running))
                if index == min(old):
                    self.cfg = running
                return
        for index in range(len(old), cfg.sip.workers):
            self.spawn(index)

    def _wait_file(self, name: str, pid: int, timeout: float) -> str:
        """Wait for a worker's marker file: "ok", "dead" (it exited, reaped here) or "timeout"."""
        path = self.run_dir / name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and "stop" not in self.flags:
            if path.exists():
                return "ok"
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return "dead"
            if done:
                log.error("worker pid %d exited with %s", pid, os.waitstatus_to_exitcode(status))
                self._forget(pid)
                return "dead"
            time.sleep(0.02)
        return "ok" if path.exists() else "timeout"

    def stop(self) -> int:
        log.info("stopping: draining %d worker(s)", len(self.workers))
        for pid in self.workers.values():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + DRAIN_SECONDS + 3
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                time.sleep(0.05)
        for pid in self.workers.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            for p in self.run_dir.iterdir():
                p.unlink()
            self.run_dir.rmdir()
        except OSError:
            pass
        log.info("stopped")
        return 0


Key = list[str | int]


def _listeners(cfg: Config) -> list[tuple[Key, str, str, int]]:
    """(config key, kind, host, port) of every listener dsbc opens."""
    from .config import Endpoint, parse_api_listen, parse_hostport

    out: list[tuple[Key, str, str, int]] = []
    if cfg.sip.enabled:
        for i, text in enumerate(cfg.sip.listen):
            e = Endpoint.parse(text)
            out.append((["sip", "listen", i], "udp" if e.transport == "udp" else "tcp", e.host, e.port))
    if cfg.control.enabled:
        host, port = parse_hostport(cfg.control.listen, 8080)
        out.append((["control", "listen"], "tcp", host, port))
    if api_wanted(cfg):
        for i, text in enumerate(cfg.api.listen):
            host, port, _ = parse_api_listen(text)
            out.append((["api", "listen", i], "tcp", host, port))
    if cfg.radius.enabled:
        for key, default in (("auth_listen", 1812), ("acct_listen", 1813)):
            host, port = parse_hostport(getattr(cfg.radius, key), default)
            out.append((["radius", key], "udp", host, port))
    if cfg.diameter.enabled:
        host, port = parse_hostport(cfg.diameter.listen, 3868)
        out.append((["diameter", "listen"], "tcp", host, port))
    return out


def _overlap(a: str, b: str) -> bool:
    """Whether listeners on hosts ``a`` and ``b`` (same port) would take the same packets."""
    wild = {"0.0.0.0", "::", "*", ""}
    if a == b:
        return True
    if a in wild and b in wild:
        return True
    if a in wild or b in wild:
        w, other = (a, b) if a in wild else (b, a)
        return w == "::" or (":" in other) == (":" in w)  # "::" takes IPv4 too (dual stack)
    return False


def check_listeners(cfg: Config) -> list[tuple[Key, str, str, int, Any]]:
    """Refuse two of dsbc's own listeners on one port, a listen host that does not resolve
    and one that is no address of this host; ConfigError naming the key.

    What `dsbc run --check` can find without taking a port (the running node holds them):
    the address is tried on a port of the kernel's choosing, released at once.  Without
    this a start with a mistyped address had every worker fail ("Cannot assign requested
    address") and be restarted until the master gave up, with no key named; a reload
    replaced worker 0 (API, RADIUS, control) and started it again on the old config.
    Returns (key, kind, host, port, socket address) of each listener."""
    import socket

    listeners = _listeners(cfg)
    out: list[tuple[Key, str, str, int, Any]] = []
    for i, (parts, kind, host, port) in enumerate(listeners):
        shown = f"[{host}]" if ":" in host else host
        for parts2, kind2, host2, port2 in listeners[:i]:
            if (kind, port) == (kind2, port2) and _overlap(host, host2):
                # SO_REUSEPORT would let both bind: the kernel would share the traffic
                raise config_error(cfg, parts, f"{kind} {shown}:{port} is {key_text(parts2)}'s too "
                                               "(one port, one listener)")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
        except OSError as exc:
            raise config_error(cfg, parts, f"cannot resolve {host!r} ({exc.strerror or exc})") from None
        family, stype, proto, _, addr = infos[0]
        try:
            sock = socket.socket(family, stype, proto)
        except OSError as exc:  # an IPv6 address on a host without IPv6
            raise config_error(cfg, parts, f"{shown}: cannot open a socket ({exc.strerror or exc})") from None
        with sock:
            try:
                sock.bind((addr[0], 0, *addr[2:]))
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    family_name = "ipv6" if family == socket.AF_INET6 else "ipv4"
                    raise config_error(cfg, parts, f"{shown} is not an address of this host (a VIP "
                                       f"that is not here yet needs net.{family_name}.ip_nonlocal_bind = 1, "
                                       "deploy/sysctl-dsbc.conf)") from None
        out.append((parts, kind, host, port, (family, stype, proto, addr)))
    return out


def check_listeners_free(cfg: Config, running: Config | None = None) -> None:
    """Refuse to start beside another process already serving our ports (and what
    `check_listeners` refuses).

    The workers bind with SO_REUSEPORT (a rolling reload needs it), so a second
    `dsbc run` would otherwise start without an error and share the ports (and its
    traffic) with the first one; the API, RADIUS and Diameter workers wait for their ports
    (a reload's predecessor holds them), so a port another program holds would cost
    restarts and say nothing of its key.  A plain bind (no SO_REUSEPORT) fails on a port
    that any socket holds; it is released at once.  On a reload (``running``: the config
    being replaced) only the listeners it does not have are tried: its own are ours."""
    import socket

    ours = {(kind, host, port) for _, kind, host, port in _listeners(running)} if running is not None else set()
    for parts, kind, host, port, (family, stype, proto, addr) in check_listeners(cfg):
        if (kind, host, port) in ours:
            continue
        shown = f"[{host}]" if ":" in host else host
        sock = socket.socket(family, stype, proto)
        if kind == "tcp":
            # past a listener, but not past the TIME_WAIT connections a dsbc that just
            # stopped left behind (a restart must not be refused for them); a UDP socket
            # must not have it (Linux lets several SO_REUSEADDR UDP sockets share a port)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise click.ClickException(str(config_error(
                    cfg, parts, f"{kind} {shown}:{port} is already in use "
                    "(another program, or another dsbc running with this config?)"))) from None
            if exc.errno == errno.EACCES:
                raise click.ClickException(str(config_error(
                    cfg, parts, f"{kind} {shown}:{port}: permission denied (a port below 1024 "
                    "needs root or CAP_NET_BIND_SERVICE, as deploy/dsbc.service gives)"))) from None
        finally:
            sock.close()


def run(cfg_path: str) -> int:
    cfg = load_config(cfg_path)
    setup_logging(cfg.log.level, cfg.log.json)
    check_listeners_free(cfg)
    cfg = preflight(cfg)  # the workers see back-end addresses only
    return Master(cfg, cfg_path).run()


def check(cfg_path: str) -> str:
    """``dsbc run --check``: what a start checks before it binds anything (the file, TLS
    and CA files, back-end names, the store, advertise addresses, the API's settings, two
    listeners on one port, listen addresses), as `nginx -t` / `kamailio -c` do; ConfigError
    if a start or a reload would be refused.  The ports themselves are not tried: the
    running node holds them."""
    cfg = load_config(cfg_path)
    check_listeners(cfg)  # as a start does, without taking the ports
    cfg = preflight(cfg, create_store=False)
    parts = [f"SIP {', '.join(cfg.sip.listen)} ({cfg.sip.workers} worker(s))" if cfg.sip.enabled else ""]
    if api_wanted(cfg):
        parts.append(f"API {', '.join(cfg.api.listen)}")
    if cfg.radius.enabled:
        parts.append(f"RADIUS {cfg.radius.auth_listen} / {cfg.radius.acct_listen}")
    if cfg.diameter.enabled:
        parts.append(f"Diameter {cfg.diameter.listen}")
    if cfg.control.enabled:
        parts.append(f"control {cfg.control.listen}")
    return f"{cfg_path}: ok: {'; '.join(p for p in parts if p) or 'nothing enabled'}"


def _run_command() -> click.Command:
    from .cli import config_options

    @click.command("run")
    @click.option("--check", "-t", "check_only", is_flag=True,
                  help="Check the config as a start would (files, names, store), print ok or "
                       "the reason, and exit (0 / 2) without starting; for ExecReload / CI.")
    @config_options
    def run_command(check_only: bool) -> None:
        """Run every dispatcher the config enables, in the foreground
        (SIGTERM drains and exits, SIGHUP reloads the config)."""
        meta = click.get_current_context().find_root().meta
        if meta.get("dsbc.store"):
            # it was accepted and ignored: the node ran on the config's store (and a reload,
            # `systemctl reload`'s check, `dsbc status` read the file's), not the one given
            raise click.UsageError("--store is not used by run: the node takes store.url from the "
                                   "config (a reload reads the file again); write it there")
        path = meta.get("dsbc.config") or os.environ.get("DSBC_CONFIG") or "dsbc.toml"
        try:
            if check_only:
                click.echo(check(path))
                sys.exit(0)
            code = run(path)
        except ConfigError as exc:
            click.echo(f"dsbc: {exc}", err=True)
            sys.exit(2 if check_only else exc.exit_code)  # --check: ok or not (0 / 2)
        sys.exit(code)

    for param in run_command.params:
        if isinstance(param, click.Option) and param.name == "store":  # refused above: not in --help
            param.hidden = True
    return run_command


run_command = _run_command()
