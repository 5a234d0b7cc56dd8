"""`portcullis run --workers N`: N proxy processes accepting on one listening socket, one supervisor.

The supervisor binds the proxy address once and hands the socket to every worker (the kernel gives
each new connection to one of them), so a worker that dies loses only its own connections. It owns
everything that is one thing to a user: the admin API and approval page, `/metrics` (every worker's
counters through prometheus-client's multiprocess mode), `proxy.started`/`proxy.stopped`, and stdout:
each worker writes its events to a pipe and the supervisor relays them as whole lines, so lines from
different workers never interleave. Decisions taken through the admin API reach the workers' held
requests on the bus (addons/bus.py). A worker that dies is started again (`worker.exited`); SIGTERM
stops them all; SIGHUP reaches every worker (rules reload, files reopen).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from addons.admin.server import AdminServer
from addons.approvals.health import StoreHealth
from addons.approvals.service import ApprovalService
from addons.approvals.stores import is_redis
from addons.approvals.stores.redis import safe_url
from addons.background import spawn
from addons.bus import Bus, LocalHub, Message
from addons.proxy.relay import LineRelay
from addons.proxy.runtime import Prepared, admin_routes, credential_service, fmt_host
from addons.redisbus import RedisBus
from addons.telemetry.events import Telemetry
from addons.telemetry.metrics import multiprocess_render, use_multiprocess

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
RESTARTS_PER_MINUTE = 5  # a worker that dies more often than this stops the proxy (exit 1)


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class Supervisor:
    def __init__(self, p: Prepared, workers: int, config_path: str) -> None:
        self.p = p
        self.n = workers
        self.config_path = config_path
        self.state = Path(tempfile.mkdtemp(prefix="portcullis-"))
        self.metrics_dir = self.state / "metrics"
        self.metrics_dir.mkdir()
        use_multiprocess(self.metrics_dir)  # before any metric of this process exists
        cfg = p.loaded.config
        self.telemetry = Telemetry(cfg.telemetry, p.loaded.base_dir)
        self.hub = LocalHub(self.state / "bus.sock")
        # With a Redis store, decisions travel on the replicas' bus (every worker subscribes too); the
        # local hub then only carries the workers' "ready" and ties them to this supervisor.
        store = cfg.approvals.store
        self.store_health = StoreHealth(self.telemetry, safe_url(store))
        self.approvals_bus: Bus = RedisBus(store, self.store_health) if is_redis(store) else self.hub
        self.approvals = ApprovalService(cfg.approvals, p.loaded.base_dir, self.telemetry,
                                         bus=self.approvals_bus, health=self.store_health)
        self.credentials = credential_service(p, self.telemetry, self.approvals_bus, leader=True,
                                              approvals=self.approvals)
        self.sock: socket.socket | None = None
        self.admin: AdminServer | None = None
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.ready: set[int] = set()
        self.restarts: dict[int, list[float]] = {}
        self.stopping = False
        self.exit_code = 0
        self._ready_event = asyncio.Event()
        self._done = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self.relays: list[LineRelay] = []  # one per worker process started; a finished one leaves

    # ---- start ---------------------------------------------------------------------------------
    async def run(self) -> int:
        try:
            await self.approvals.start()
            await self.credentials.start()
            if isinstance(self.approvals_bus, RedisBus):
                await self.approvals_bus.start()
        except Exception as e:
            print(f"{self.p.loaded.path}: approvals: {e}", file=sys.stderr)
            with contextlib.suppress(Exception):
                await self.approvals.stop()
            return self._cleanup(2)
        try:
            self.sock = _bind(self.p.listen)
        except OSError as e:
            print(f"portcullis: cannot listen on {self.p.listen[0]}:{self.p.listen[1]}: {e}", file=sys.stderr)
            return self._cleanup(1)
        await self.hub.start()
        self.hub.subscribe(self._on_message)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.sighup)
        admin = await self._start_admin()
        if admin is None:
            return self._cleanup(1)
        for i in range(self.n):
            await self._spawn(i)
        try:
            await asyncio.wait_for(self._ready_event.wait(), READY_TIMEOUT_S)
        except TimeoutError:
            print(f"portcullis: {self.n - len(self.ready)} worker(s) did not start", file=sys.stderr)
            self.exit_code = 1
            self.stop()
        if not self.stopping:
            listen = self.sock.getsockname()
            self.telemetry.emit(
                "proxy.started",
                listen=[f"{fmt_host(str(listen[0]))}:{listen[1]}"],
                admin=admin,
                mode=self.p.loaded.config.mode,
                rule_count=self.p.loaded.policy.rule_count,
                credential_names=sorted(self.p.loaded.policy.credentials.names),
                pid=os.getpid(),
                workers=self.n,
            )
        await self._done.wait()
        return await self._shutdown()

    async def _start_admin(self) -> str | None:
        token = self.p.token
        self.admin = AdminServer(
            self.p.admin[0],
            self.p.admin[1],
            token,
            lambda: multiprocess_render(self.metrics_dir),
            lambda: not self.stopping and len(self.ready) == self.n,
            admin_routes(self.p, self.approvals, self.credentials),
        )
        try:
            host, port = await self.admin.start()
        except Exception as e:
            print(
                f"portcullis: cannot start the admin server on {self.p.admin[0]}:{self.p.admin[1]}: {e}",
                file=sys.stderr,
            )
            return None
        self.admin_bound = (host, port)
        self.approvals.admin_url = f"http://{fmt_host(host)}:{port}"
        return f"{fmt_host(host)}:{port}"

    async def _spawn(self, i: int) -> None:
        assert self.sock is not None
        host, port = self.sock.getsockname()[:2]
        admin_host, admin_port = self.admin_bound
        fd = self.sock.fileno()
        cmd = [
            sys.executable,
            "-m",
            "addons.cli",
            "run",
            "--config",
            self.config_path,
            "--listen",
            f"{fmt_host(host)}:{port}",
            "--admin",
            f"{fmt_host(admin_host)}:{admin_port}",
            "--worker",
            str(i),
            "--worker-fd",
            str(fd),
            "--worker-bus",
            str(self.hub.path),
        ]
        r, w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=w, pass_fds=(fd,), env=os.environ.copy())
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        relay = LineRelay(f"worker {i}", self.telemetry.relay_line, self.telemetry.stdout_stalled,
                          self.telemetry.metrics.events_dropped.labels("stdout").inc)
        await asyncio.get_running_loop().connect_read_pipe(lambda: relay, os.fdopen(r, "rb", buffering=0))
        self.procs[i] = proc
        self.relays = [x for x in self.relays if not x.done.done()] + [relay]
        self._tasks.append(spawn(self._watch(i, proc), f"watch-{i}"))

    # ---- while running ------------------------------------------------------------------------
    def _on_message(self, m: Message) -> None:
        if m.get("t") == "worker.ready" and isinstance(m.get("worker"), int):
            self.ready.add(m["worker"])
            if len(self.ready) == self.n:
                self._ready_event.set()

    async def _watch(self, i: int, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        self.ready.discard(i)
        _forget_metrics(self.metrics_dir, proc.pid)
        if self.stopping or self.procs.get(i) is not proc:
            return
        now = time.monotonic()
        recent = [t for t in self.restarts.get(i, []) if now - t < 60] + [now]
        self.restarts[i] = recent
        give_up = len(recent) > RESTARTS_PER_MINUTE
        self.telemetry.emit(
            "worker.exited",
            worker=i,
            pid=proc.pid,
            exit_code=code if code >= 0 else None,
            signal=signal.Signals(-code).name if code < 0 else None,
            restarted=not give_up,
        )
        if give_up:
            print(f"portcullis: worker {i} keeps dying; stopping", file=sys.stderr)
            self.exit_code = 1
            self.stop()
            return
        await asyncio.sleep(min(5.0, 0.2 * 2 ** (len(recent) - 1)))
        if not self.stopping:
            await self._spawn(i)

    def sighup(self) -> None:
        self.telemetry.reopen()
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGHUP)

    # ---- stop ---------------------------------------------------------------------------------
    def stop(self) -> None:
        self.stopping = True
        self._done.set()

    async def _shutdown(self) -> int:
        deadline = time.monotonic() + STOP_TIMEOUT_S  # how long a stalled stdout may hold the last events
        for relay in self.relays:
            relay.finish_by(deadline)
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for relay in self.relays:  # a relay is done once its pipe is at EOF and all is written
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(relay.done), max(0.0, deadline - time.monotonic()) + 2)
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, 2)
        if self.admin is not None:
            await self.admin.stop()
        with contextlib.suppress(Exception):
            await self.approvals.stop()
        with contextlib.suppress(Exception):
            await self.credentials.stop()
        if self.approvals_bus is not self.hub:
            with contextlib.suppress(Exception):
                await self.approvals_bus.close()
        await self.hub.close()
        self.telemetry.emit("proxy.stopped", exit_code=self.exit_code)
        return self._cleanup(self.exit_code)

    def _cleanup(self, code: int) -> int:
        self.telemetry.close()
        if self.sock is not None:
            self.sock.close()
        shutil.rmtree(self.state, ignore_errors=True)
        return code


def _bind(addr: tuple[str, int]) -> socket.socket:
    """The proxy's listening socket, shared by every worker (their accept queue: 1024)."""
    host, port = addr
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(sockaddr)
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def _forget_metrics(path: Path, pid: int) -> None:
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


def run_supervisor(p: Prepared, workers: int, config_path: str) -> int:
    return asyncio.run(Supervisor(p, workers, config_path).run())
