"""`portcullis run`: one process: a minimal mitmproxy Master, the Portcullis addon, the admin server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from mitmproxy import master as mmaster
from mitmproxy import options
from mitmproxy.addons import core, proxyserver, tlsconfig

from addons.admin.server import AdminConfigError, AdminServer, RouteAdder, check_token_policy
from addons.approvals import api as approvals_api
from addons.approvals.service import ApprovalService
from addons.background import spawn
from addons.config.load import LoadedConfig, PolicyError, load_config
from addons.pipeline.decide import Pipeline
from addons.pipeline.dns import system_lookup
from addons.pipeline.identity import AuthConfigError, ProxyAuth
from addons.policy.authority import AuthorityError, split_authority
from addons.proxy import mitm_compat
from addons.proxy.addon import Portcullis
from addons.proxy.ca import ensure_ca
from addons.proxy.reload import PolicyHolder
from addons.proxy.responses import error_body, h2_error_headers, http1_error_response
from addons.proxy.tunnel import TunnelAwareNextLayer
from addons.telemetry.events import Telemetry
from addons.telemetry.syslog import SyslogConfigError

log = logging.getLogger("portcullis")


class StartupError(Exception):
    """A problem found before listening: printed as one line, exit status 2."""


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    try:
        host, port = split_authority(text, allow_zero=True)
    except AuthorityError as e:
        raise StartupError(f"{what}: {e} (expected HOST:PORT)") from e
    if port is None:
        raise StartupError(f"{what}: {text!r} has no port (expected HOST:PORT)")
    return host.strip("[]"), port


def upstream_bundle(loaded: LoadedConfig, ca_dir: Path) -> str | None:
    """tls.upstream_ca is trusted in addition to the system roots: write one combined bundle."""
    extra = loaded.config.tls.upstream_ca
    if not extra:
        return None
    import certifi

    path = loaded.resolve_path(extra)
    try:
        extra_pem = path.read_text()
    except OSError as e:
        raise StartupError(f"{loaded.path}: tls.upstream_ca: cannot read {path}: {e}") from e
    bundle = ca_dir / "upstream-trust.pem"
    bundle.write_text(Path(certifi.where()).read_text() + "\n" + extra_pem)
    return str(bundle)


def local_addresses() -> set[str]:
    """This host's addresses (for the 'never connect to myself' check when listening on 0.0.0.0)."""
    out = {"127.0.0.1", "::1"}
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            out.add(str(info[4][0]).split("%", 1)[0])
    return out


LISTEN_BACKLOG = 1024  # asyncio's default accept queue (100) refuses bursts of new agents


class Lifecycle:
    """mitmproxy addon for start/stop: admin server, approvals, watcher, proxy.started/stopped."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def running(self) -> None:
        await self.rt.on_running()

    async def done(self) -> None:
        await self.rt.on_done()


class Runtime:
    """Everything one `portcullis run` owns, wired together."""

    def __init__(
        self,
        loaded: LoadedConfig,
        listen: tuple[str, int],
        admin: tuple[str, int],
        token: str | None,
        auth: ProxyAuth,
        ca_dir: Path,
        bundle: str | None,
    ) -> None:
        self.loaded = loaded
        self.listen = listen
        self.admin_addr = admin
        self.token = token
        self.ca_dir = ca_dir
        self.bundle = bundle
        cfg = loaded.config
        self.telemetry = Telemetry(cfg.telemetry, loaded.base_dir)
        self.holder = PolicyHolder(loaded, self.telemetry)
        self.approvals = ApprovalService(cfg.approvals, loaded.base_dir, self.telemetry)
        self.own: set[tuple[str, int]] = set()
        self.own_loopback_ports: set[int] = set()  # listeners that every 127.0.0.0/8 / ::1 address reaches
        self.pipeline = Pipeline(
            self.holder,
            auth=auth,
            approvals=self.approvals,
            lookup=system_lookup,
            audit=cfg.mode == "audit",
            healthy=self.telemetry.healthy,
            is_own=self.is_own,
        )
        client_cidrs = [ipaddress.ip_network(c, strict=False) for cl in cfg.clients for c in cl.cidrs]
        self.addon = Portcullis(self.pipeline, self.telemetry, client_cidrs)
        self.admin: AdminServer | None = None
        self.master: Any = None
        self.proxy_up = False
        self.exit_code = 0
        self._tasks: list[asyncio.Task[Any]] = []

    def route_adders(self) -> list[RouteAdder]:
        service, token = self.approvals, self.token
        return [lambda app: approvals_api.add_routes(app, service, token)]

    def build_master(self) -> Any:
        opts = options.Options(
            listen_host=self.listen[0], listen_port=self.listen[1], mode=["regular"], confdir=str(self.ca_dir)
        )
        m: Any = mmaster.Master(opts)  # mitmproxy's addon manager and options are untyped
        proxy_server: Any = proxyserver.Proxyserver
        # Only what Portcullis needs: every extra addon costs hook dispatch on every event (mitmdump's
        # 31 default addons cost about 40% of the throughput; README, Performance).
        m.addons.add(
            core.Core(),
            proxy_server(),
            TunnelAwareNextLayer(self.addon.tunnel_next_layer),
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
            ssl_verify_upstream_trusted_ca=self.bundle,
        )
        self.master = m
        return m

    async def on_running(self) -> None:
        assert self.master is not None
        ps = self.master.addons.get("proxyserver")
        addrs = list(ps.listen_addrs()) if ps else []
        if not addrs:
            print(f"portcullis: cannot listen on {self.listen[0]}:{self.listen[1]}", file=sys.stderr)
            self.exit_code = 1
            self.master.shutdown()
            return
        for a in addrs:
            self._add_own(str(a[0]), int(a[1]))
        mitm_compat.raise_listen_backlog(ps, LISTEN_BACKLOG)
        self.admin = AdminServer(
            self.admin_addr[0],
            self.admin_addr[1],
            self.token,
            self.telemetry.metrics.render,
            self.ready,
            self.route_adders(),
        )
        try:
            admin_bound = await self.admin.start()
        except Exception as e:
            where = f"{self.admin_addr[0]}:{self.admin_addr[1]}"
            print(f"portcullis: cannot start the admin server on {where}: {e}", file=sys.stderr)
            self.exit_code = 1
            self.master.shutdown()
            return
        self._add_own(*admin_bound)
        # Webhook decide_url links point at the admin port actually bound.
        self.approvals.admin_url = f"http://{_fmt(admin_bound[0])}:{admin_bound[1]}"
        self.proxy_up = True
        self._tasks.append(spawn(self.holder.watch(), "rule-watcher"))
        self.telemetry.emit(
            "proxy.started",
            listen=[f"{_fmt(str(a[0]))}:{a[1]}" for a in addrs],
            admin=f"{_fmt(admin_bound[0])}:{admin_bound[1]}",
            mode=self.loaded.config.mode,
            rule_count=self.holder.policy.rule_count,
            pid=os.getpid(),
        )

    def _add_own(self, host: str, port: int) -> None:
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return
        hosts = local_addresses() if ip.is_unspecified else {str(ip)}
        self.own.update((h, port) for h in hosts)
        if ip.is_unspecified or ip.is_loopback:
            self.own_loopback_ports.add(port)

    def is_own(self, ip: str, port: int) -> bool:
        """Is ip:port one of this process's listeners (proxy or admin)?"""
        if (ip, port) in self.own:
            return True
        if port not in self.own_loopback_ports:
            return False
        try:
            return ipaddress.ip_address(ip).is_loopback  # Linux routes all of 127/8 to lo
        except ValueError:
            return False

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
        self.telemetry.emit("proxy.stopped", exit_code=self.exit_code)
        self.telemetry.close()

    def sighup(self) -> None:
        self.telemetry.reopen()
        self._tasks.append(spawn(self.holder.reload("sighup"), "reload-sighup"))


def _fmt(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def prepare(args: argparse.Namespace) -> Runtime:
    """Everything that can fail before listening. Raises StartupError / PolicyError."""
    if (unsupported := mitm_compat.check_version()) is not None:
        raise StartupError(f"portcullis: {unsupported}")
    loaded = load_config(args.config)
    cfg = loaded.config
    listen = parse_hostport(args.listen or cfg.listen, "listen")
    admin = parse_hostport(args.admin or cfg.admin.listen, "admin.listen")
    token = os.environ.get(cfg.admin.token_env) or None
    try:
        check_token_policy(admin[0], token, cfg.admin.token_env)
        auth = ProxyAuth(cfg)
    except (AdminConfigError, AuthConfigError) as e:
        raise StartupError(f"{loaded.path}: {e}") from e
    ca_dir = loaded.resolve_path(cfg.tls.ca_dir)
    try:
        ensure_ca(ca_dir)
    except OSError as e:
        raise StartupError(f"{loaded.path}: tls.ca_dir: cannot create the CA in {ca_dir}: {e}") from e
    try:
        return Runtime(loaded, listen, admin, token, auth, ca_dir, upstream_bundle(loaded, ca_dir))
    except SyslogConfigError as e:
        raise StartupError(f"{loaded.path}: {e}") from e


async def _serve(rt: Runtime) -> int:
    try:
        # Store and webhook secrets: a problem here is a config error, found before listening.
        await rt.approvals.start()
    except Exception as e:
        print(f"{rt.loaded.path}: approvals: {e}", file=sys.stderr)
        rt.telemetry.close()
        return 2
    mitm_compat.install(http1_error_response, error_body, h2_error_headers, rt.addon.record_refusal)
    m = rt.build_master()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, m.shutdown)
    loop.add_signal_handler(signal.SIGHUP, rt.sighup)
    await m.run()
    return rt.exit_code


def run_command(args: argparse.Namespace) -> int:
    """`portcullis run --config FILE [--listen H:P] [--admin H:P]`."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        rt = prepare(args)
    except PolicyError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 2
    except StartupError as e:
        print(str(e), file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{args.config}:1:1: cannot read: {e}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(rt))
