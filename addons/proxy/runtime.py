"""One proxy process: a minimal mitmproxy Master, the Portcullis addon, and (alone) the admin server.

With `--workers 1` (or one core) this is the whole of `portcullis run`. With `--workers N` the
supervisor (addons/proxy/supervisor.py) starts N of these as workers: each accepts on the listening
socket it inherited, writes its events (naming itself) to a pipe the supervisor relays, hears
decisions taken elsewhere on the bus, and leaves the admin API and `/metrics` to the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import master as mmaster
from mitmproxy import options
from mitmproxy.addons import core, proxyserver, tlsconfig

from addons.admin.server import AdminServer, RouteAdder
from addons.approvals import api as approvals_api
from addons.approvals.auth import Principals
from addons.approvals.health import StoreHealth
from addons.approvals.service import ApprovalService
from addons.approvals.stores import is_redis
from addons.approvals.stores.redis import safe_url
from addons.background import spawn
from addons.bus import Bus, LocalBus, NullBus
from addons.config.load import LoadedConfig
from addons.credentials import api as credentials_api
from addons.credentials.service import CredentialService
from addons.credentials.stores import open_credential_store
from addons.pipeline.decide import Pipeline
from addons.pipeline.dns import system_lookup
from addons.pipeline.identity import ProxyAuth
from addons.proxy import mitm_compat
from addons.proxy.addon import Portcullis
from addons.proxy.reload import PolicyHolder
from addons.proxy.responses import error_body, h2_error_headers, http1_error_response
from addons.redisbus import RedisBus
from addons.telemetry.events import Telemetry

LISTEN_BACKLOG = 1024  # asyncio's default accept queue (100) refuses bursts of new agents


@dataclass(frozen=True)
class Prepared:
    """Everything checked before anything listens (addons/proxy/launcher.py:prepare)."""

    loaded: LoadedConfig
    listen: tuple[str, int]
    admin: tuple[str, int]
    token: str | None
    principals: Principals
    auth: ProxyAuth
    ca_dir: Path
    bundle: str | None


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is told by its supervisor (hidden `portcullis run` arguments)."""

    index: int
    listen_fd: int
    bus_path: Path


def credential_service(p: Prepared, telemetry: Telemetry, bus: Bus, leader: bool,
                       approvals: ApprovalService) -> CredentialService:
    """Task credentials beside the approvals (same SQLite file or Redis), for one process; a revoked
    task's approval grants go with it."""
    cfg = p.loaded.config
    profiles = p.loaded.policy.settings.profiles
    return CredentialService(
        cfg.credentials, lambda: open_credential_store(cfg.approvals.store, p.loaded.base_dir), telemetry,
        profiles=lambda: profiles, reserved_users=p.auth.users, bus=bus, leader=leader,
        on_revoke=approvals.forget_task,
    )


def admin_routes(p: Prepared, approvals: ApprovalService, credentials: CredentialService) -> list[RouteAdder]:
    """The admin API's routes beyond health and metrics: approvals (and the page), task credentials."""
    cfg, principals = p.loaded.config, p.principals
    proxy_url = cfg.credentials.proxy_url or f"http://{fmt_host(p.listen[0])}:{p.listen[1]}"
    return [
        lambda app: approvals_api.add_routes(app, approvals, principals, approvals.links),
        lambda app: credentials_api.add_routes(app, credentials, principals, proxy_url),
    ]


class OwnAddresses:
    """The proxy's own listeners (proxy and admin), never a destination."""

    def __init__(self) -> None:
        self.own: set[tuple[str, int]] = set()
        self.loopback_ports: set[int] = set()  # listeners that every 127.0.0.0/8 / ::1 address reaches

    def add(self, host: str, port: int) -> None:
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return
        hosts = local_addresses() if ip.is_unspecified else {str(ip)}
        self.own.update((h, port) for h in hosts)
        if ip.is_unspecified or ip.is_loopback:
            self.loopback_ports.add(port)

    def __call__(self, ip: str, port: int) -> bool:
        """Is ip:port one of this proxy's listeners?"""
        if (ip, port) in self.own:
            return True
        if port not in self.loopback_ports:
            return False
        try:
            return ipaddress.ip_address(ip).is_loopback  # Linux routes all of 127/8 to lo
        except ValueError:
            return False


def local_addresses() -> set[str]:
    """This host's addresses (for the 'never connect to myself' check when listening on 0.0.0.0)."""
    out = {"127.0.0.1", "::1"}
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            out.add(str(info[4][0]).split("%", 1)[0])
    return out


def fmt_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class Lifecycle:
    """mitmproxy addon for start/stop: admin server, approvals, watcher, proxy.started/stopped."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def running(self) -> None:
        await self.rt.on_running()

    async def done(self) -> None:
        await self.rt.on_done()


class Runtime:
    """Everything one proxy process owns, wired together."""

    def __init__(self, p: Prepared, worker: WorkerSpec | None = None) -> None:
        self.p = p
        self.worker = worker
        cfg = p.loaded.config
        self.telemetry = Telemetry(cfg.telemetry, p.loaded.base_dir, worker=worker.index if worker else None)
        self.holder = PolicyHolder(p.loaded, self.telemetry)
        # A worker is tied to its supervisor by the local bus (it stops when the supervisor is gone)
        # and leaves sweeping, webhook re-sends and the pending count to the supervisor.
        self.bus: Bus = LocalBus(worker.bus_path, on_lost=self._supervisor_gone) if worker else NullBus()
        # Decisions taken elsewhere arrive on the local bus (workers sharing a SQLite file) or, with a
        # Redis store, on the replicas' bus: every process of every replica subscribes to it.
        store = cfg.approvals.store
        self.store_health = StoreHealth(self.telemetry, safe_url(store))
        self.approvals_bus: Bus = RedisBus(store, self.store_health) if is_redis(store) else self.bus
        self.approvals = ApprovalService(
            cfg.approvals, p.loaded.base_dir, self.telemetry, leader=worker is None, bus=self.approvals_bus,
            health=self.store_health, require_store=worker is None,  # a worker may (re)start in an outage
        )
        self.credentials = credential_service(p, self.telemetry, self.approvals_bus, leader=worker is None,
                                              approvals=self.approvals)
        self.own = OwnAddresses()
        self.pipeline = Pipeline(
            self.holder,
            auth=p.auth,
            credentials=self.credentials,
            require_credentials=cfg.credentials.required,
            approvals=self.approvals,
            lookup=system_lookup,
            audit=cfg.mode == "audit",
            healthy=self.telemetry.healthy,
            stalled=self.telemetry.sink_stalled,
            is_own=self.own,
        )
        client_cidrs = [ipaddress.ip_network(c, strict=False) for cl in cfg.clients for c in cl.cidrs]
        self.addon = Portcullis(self.pipeline, self.telemetry, client_cidrs)
        self.admin: AdminServer | None = None
        self.master: Any = None
        self.proxy_up = False
        self.exit_code = 0
        self._tasks: list[asyncio.Task[Any]] = []

    def route_adders(self) -> list[RouteAdder]:
        return admin_routes(self.p, self.approvals, self.credentials)

    def build_master(self) -> Any:
        opts = options.Options(
            listen_host=self.p.listen[0],
            listen_port=self.p.listen[1],
            mode=["regular"],
            confdir=str(self.p.ca_dir),
        )
        m: Any = mmaster.Master(opts)  # mitmproxy's addon manager and options are untyped
        proxy_server: Any = proxyserver.Proxyserver
        # Only what Portcullis needs: every extra addon costs hook dispatch on every event (mitmdump's
        # 31 default addons cost about 40% of the throughput; README, Performance).
        m.addons.add(
            core.Core(),
            proxy_server(),
            mitm_compat.TunnelAwareNextLayer(self.addon.tunnel_next_layer),
            tlsconfig.TlsConfig(),
            self.addon,
            Lifecycle(self),
        )
        m.options.update(
            connection_strategy="eager",  # decide before connecting; a failed connect is a clean 502
            rawtcp=False,  # no silent raw relay: tunnels are ours to decide (next_layer)
            websocket=True,
            stream_large_bodies="1m",  # decided on headers; big bodies stream, never buffered whole
            validate_inbound_headers=True,  # mitmproxy's own smuggling checks (CL/TE): refused and logged
            ssl_verify_upstream_trusted_ca=self.p.bundle,
            # Nothing moving either way for this long (a stalled upstream, an idle client): closed.
            tcp_timeout=max(1, round(self.p.loaded.config.network.idle_timeout)),
        )
        self.master = m
        return m

    async def on_running(self) -> None:
        assert self.master is not None
        ps = self.master.addons.get("proxyserver")
        addrs = mitm_compat.listen_addresses(ps)
        if not addrs:
            print(f"portcullis: cannot listen on {self.p.listen[0]}:{self.p.listen[1]}", file=sys.stderr)
            self.exit_code = 1
            self.master.shutdown()
            return
        for a in addrs:
            self.own.add(str(a[0]), int(a[1]))
        if self.worker is not None:
            await self._join_supervisor()
            return
        mitm_compat.raise_listen_backlog(ps, LISTEN_BACKLOG)
        self.admin = AdminServer(
            self.p.admin[0],
            self.p.admin[1],
            self.p.token,
            self.telemetry.metrics.render,
            self.ready,
            self.route_adders(),
        )
        try:
            admin_bound = await self.admin.start()
        except Exception as e:
            where = f"{self.p.admin[0]}:{self.p.admin[1]}"
            print(f"portcullis: cannot start the admin server on {where}: {e}", file=sys.stderr)
            self.exit_code = 1
            self.master.shutdown()
            return
        self.own.add(*admin_bound)
        # Webhook decide_url links point at the admin port actually bound.
        self.approvals.admin_url = f"http://{fmt_host(admin_bound[0])}:{admin_bound[1]}"
        self.proxy_up = True
        self._tasks.append(spawn(self.holder.watch(), "rule-watcher"))
        self.telemetry.emit(
            "proxy.started",
            listen=[f"{fmt_host(str(a[0]))}:{a[1]}" for a in addrs],
            admin=f"{fmt_host(admin_bound[0])}:{admin_bound[1]}",
            mode=self.p.loaded.config.mode,
            rule_count=self.holder.policy.rule_count,
            credential_names=sorted(self.holder.policy.credentials.names),
            pid=os.getpid(),
        )

    async def _join_supervisor(self) -> None:
        """A worker: the admin address is the supervisor's; tell it this worker serves."""
        assert self.worker is not None
        self.own.add(*self.p.admin)
        self.approvals.admin_url = f"http://{fmt_host(self.p.admin[0])}:{self.p.admin[1]}"
        self.proxy_up = True
        self._tasks.append(spawn(self.holder.watch(), "rule-watcher"))
        self.bus.publish({"t": "worker.ready", "worker": self.worker.index, "pid": os.getpid()})

    def _supervisor_gone(self) -> None:
        if self.master is not None:
            self.master.shutdown()

    def ready(self) -> bool:
        return self.proxy_up and self.holder.policy is not None

    async def on_done(self) -> None:
        self.proxy_up = False
        self.holder.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.admin is not None:
            await self.admin.stop()
        with contextlib.suppress(Exception):
            await self.approvals.stop()
        if self.approvals_bus is not self.bus:
            with contextlib.suppress(Exception):
                await self.approvals_bus.close()
        with contextlib.suppress(Exception):
            await self.credentials.stop()
        with contextlib.suppress(Exception):
            await self.bus.close()
        if self.worker is None:
            self.telemetry.emit("proxy.stopped", exit_code=self.exit_code)
        self.telemetry.close()

    def sighup(self) -> None:
        self.telemetry.reopen()
        self._tasks.append(spawn(self.holder.reload("sighup"), "reload-sighup"))


async def serve(rt: Runtime) -> int:
    """Run one proxy process until SIGTERM/SIGINT (exit 0) or a failure to start (1, 2)."""
    try:
        if isinstance(rt.bus, LocalBus):
            await rt.bus.start()
        # Store and webhook secrets: a problem here is a config error, found before listening.
        await rt.approvals.start()
        await rt.credentials.start()
        if isinstance(rt.approvals_bus, RedisBus):
            await rt.approvals_bus.start(required=rt.worker is None)
    except Exception as e:
        print(f"{rt.p.loaded.path}: approvals: {e}", file=sys.stderr)
        with contextlib.suppress(Exception):
            await rt.approvals.stop()
        rt.telemetry.close()
        return 2
    mitm_compat.install(http1_error_response, error_body, h2_error_headers, rt.addon.record_refusal)
    mitm_compat.set_head_timeout(rt.p.loaded.config.network.header_timeout)
    if rt.worker is not None:
        mitm_compat.listen_on(socket.socket(fileno=rt.worker.listen_fd))
    m = rt.build_master()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, m.shutdown)
    loop.add_signal_handler(signal.SIGHUP, rt.sighup)
    await m.run()
    return rt.exit_code
