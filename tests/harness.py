"""Reusable end-to-end harness: a real Portcullis proxy subprocess plus loopback upstreams.

Typical use (pytest):

    from tests.harness import Upstreams, PortcullisProc, upstreams  # noqa: F401  (fixture)

    def test_x(upstreams, tmp_path):
        with PortcullisProc(tmp_path, upstreams, rules=[{"name": "pub", "action": "allow",
                                                          "hosts": ["public.test"]}]) as p:
            r = p.curl(f"http://public.test:{upstreams.http_port}/hello")
            assert r.status == 200
            ev = p.wait_event("egress.decision")

Upstreams (one set per test session, in a background thread):
  - 127.0.0.2:http_port   plain HTTP; answers JSON describing the request (method, path, host, headers);
                          `/ws` is a websocket echo; `/sse` streams one event, the next after release_sse()
  - 127.0.0.2:tls_port    the same over TLS, cert for public.test, *.public.test (test CA: upstreams.ca_pem)
  - 127.0.0.3:other_tls_port  TLS with a cert for other.test only
  - 127.0.0.2:sink_port   raw TCP sink counting every byte it receives (upstreams.sink)
  - 127.0.0.2:greet_port  raw TCP server that speaks first ("SSH-2.0-test") and echoes
  - 127.0.0.2:h2_port     HTTP/2-only TLS server (ALPN h2, same cert as tls_port), JSON answers
  - 127.0.0.2:record_port / record_tls_port  raw recorders: every byte of each connection kept as sent
                          (`upstreams.recorded`, no HTTP parser in between), one canned 200 per connection
`base_config()` (the default config) maps public.test, api/www/deep.api.public.test, blocked.test,
approve.test -> 127.0.0.2 and other.test -> 127.0.0.3 in `network.resolve`, and `network.allow_cidrs`
admits 127.0.0.2/32 and 127.0.0.3/32, so 127.0.0.1 stays private. default_action is deny.

PortcullisProc: `raw()` / `raw_many()` / `connect_tunnel()` for byte-exact clients, `curl()` (trusts the
test CA and the proxy CA), `find()` / `wait_event()` / `decisions()` over the captured JSON events
(dotted keys: `wait_event("egress.decision", **{"request.path": "/x"})`), `write_rules()` for reloads,
`netns=True` to run the proxy (and `raw`/`curl`) inside a fresh network namespace with only lo up.
On a clean exit every captured event is validated against the shipped JSON Schemas.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
PUBLIC_IP = "127.0.0.2"
OTHER_IP = "127.0.0.3"
START_TIMEOUT = 20.0

# ---------------------------------------------------------------------------------------------- PKI


def make_pki(folder: Path) -> dict[str, Path]:
    """A throwaway CA and two server certs (public.test + *.public.test, other.test)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Portcullis Test Upstream CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": folder / "test-ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(tag: str, names: list[str]) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        out[tag + "_cert"] = folder / f"{tag}.crt"
        out[tag + "_key"] = folder / f"{tag}.key"
        out[tag + "_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[tag + "_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    leaf("public", ["public.test", "*.public.test"])
    leaf("other", ["other.test"])
    return out


# ------------------------------------------------------------------------------------------ upstreams


@dataclass
class Sink:
    """What the raw TCP sink saw."""

    connections: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.connections, self.bytes


class Upstreams:
    """Loopback servers in a background event loop. Start with `start()`, stop with `stop()`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pki = make_pki(folder / "pki")
        self.ca_pem = self.pki["ca"]
        self.requests: list[dict[str, Any]] = []
        self.sink = Sink()
        self.http_port = self.tls_port = self.other_tls_port = self.sink_port = self.greet_port = 0
        self.h2_port = self.record_port = self.record_tls_port = 0
        self.recorded: list[bytes] = []  # raw bytes of each connection to the recorders
        self.closed_port = _free_port(PUBLIC_IP)  # nothing listens here: connect is refused
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="upstreams", daemon=True)
        self._cleanups: list[Any] = []
        self._lock = threading.Lock()

    def start(self) -> Upstreams:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(15)
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def release_sse(self) -> None:
        """Let the pending /sse response send its second event."""
        gate = getattr(self, "_sse_gate", None)
        if gate is not None:
            self._loop.call_soon_threadsafe(gate.set)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
        with self.sink.lock:
            self.sink.connections = self.sink.bytes = 0
        with self._lock:
            self.recorded.clear()

    def recorded_bytes(self) -> list[bytes]:
        with self._lock:
            return list(self.recorded)

    def seen(self, pred: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if pred is None or pred(r)]

    async def _start(self) -> None:
        from aiohttp import web

        async def handle(request: web.Request, name: str) -> web.StreamResponse:
            if request.path == "/ws":
                ws = web.WebSocketResponse()
                await ws.prepare(request)
                async for msg in ws:
                    if msg.type == 1:  # TEXT
                        await ws.send_str("echo:" + msg.data)
                return ws
            if request.path == "/sse":
                # Server-sent events: one event now, the second only after release_sse() (so a client
                # can only see the first one if the proxy streams the response).
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await resp.prepare(request)
                await resp.write(b"data: first\n\n")
                self._sse_gate = asyncio.Event()
                await asyncio.wait_for(self._sse_gate.wait(), 15)
                await resp.write(b"data: second\n\n")
                await resp.write_eof()
                return resp
            body = await request.read()
            peer = request.transport.get_extra_info("peername") if request.transport else None
            info = {
                "server": name,
                "method": request.method,
                "path": request.path_qs,
                "host": request.headers.get("Host"),
                "headers": dict(request.headers),
                "body_len": len(body),
                "peer_port": peer[1] if peer else None,
            }
            with self._lock:
                self.requests.append(info)
            return web.json_response(info)

        def app(name: str) -> web.Application:
            a = web.Application(client_max_size=64 * 1024 * 1024)

            async def named(request: web.Request) -> web.StreamResponse:
                return await handle(request, name)

            a.router.add_route("*", "/{tail:.*}", named)
            return a

        def tls_ctx(tag: str) -> ssl.SSLContext:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(self.pki[tag + "_cert"], self.pki[tag + "_key"])
            return ctx

        async def site(a: web.Application, host: str, ctx: ssl.SSLContext | None) -> int:
            runner = web.AppRunner(a, access_log=None)
            await runner.setup()
            s = web.TCPSite(runner, host, 0, ssl_context=ctx)
            await s.start()
            self._cleanups.append(runner.cleanup)
            return int(s._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

        self.http_port = await site(app("http"), PUBLIC_IP, None)
        self.tls_port = await site(app("tls"), PUBLIC_IP, tls_ctx("public"))
        self.other_tls_port = await site(app("other"), OTHER_IP, tls_ctx("other"))

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with self.sink.lock:
                self.sink.connections += 1
            while data := await reader.read(65536):
                with self.sink.lock:
                    self.sink.bytes += len(data)
            writer.close()

        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"SSH-2.0-test\r\n")
            await writer.drain()
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        h2_ctx = tls_ctx("public")
        h2_ctx.set_alpn_protocols(["h2"])
        srv = await asyncio.start_server(self._h2_conn, PUBLIC_IP, 0, ssl=h2_ctx)
        self.h2_port = int(srv.sockets[0].getsockname()[1])
        self._cleanups.append(_closer(srv))

        async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Raw bytes as the upstream receives them; a request head (for the suite's audit) when it parses.
            data = b""
            with contextlib.suppress(Exception):
                while b"\r\n\r\n" not in data and len(data) < 1 << 20:
                    chunk = await asyncio.wait_for(reader.read(65536), 5)
                    if not chunk:
                        break
                    data += chunk
            self._record(data)  # before answering: a client that saw the answer finds the bytes here
            with contextlib.suppress(Exception):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                await writer.drain()
            writer.close()

        srv = await asyncio.start_server(record, PUBLIC_IP, 0)
        self.record_port = int(srv.sockets[0].getsockname()[1])
        self._cleanups.append(_closer(srv))
        srv = await asyncio.start_server(record, PUBLIC_IP, 0, ssl=tls_ctx("public"))
        self.record_tls_port = int(srv.sockets[0].getsockname()[1])
        self._cleanups.append(_closer(srv))

        for handler, attr in ((sink, "sink_port"), (greet, "greet_port")):
            srv = await asyncio.start_server(handler, PUBLIC_IP, 0)
            setattr(self, attr, int(srv.sockets[0].getsockname()[1]))
            self._cleanups.append(_closer(srv))

    def _record(self, data: bytes) -> None:
        """Keep one recorder connection's bytes (and, when it parses, a request line for the audit)."""
        line, _, rest = data.partition(b"\r\n")
        parts = line.split(b" ")
        host = next(
            (h.split(b":", 1)[1].strip() for h in rest.split(b"\r\n") if h.lower().startswith(b"host:")), b""
        )
        with self._lock:
            self.recorded.append(data)
            if data:
                self.requests.append(
                    {
                        "server": "recorder",
                        "method": parts[0].decode("latin-1"),
                        "path": parts[1].decode("latin-1") if len(parts) > 1 else None,
                        "host": host.decode("latin-1"),
                    }
                )

    async def _h2_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A tiny HTTP/2-only (ALPN h2) server answering JSON like the HTTP/1 upstreams."""
        import h2.config
        import h2.connection
        import h2.events

        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        try:
            while data := await reader.read(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        hdrs = {str(k): str(v) for k, v in ev.headers}
                        info = {
                            "server": "h2",
                            "method": hdrs.get(":method"),
                            "path": hdrs.get(":path"),
                            "host": hdrs.get(":authority"),
                            "headers": hdrs,
                            "body_len": 0,
                        }
                        with self._lock:
                            self.requests.append(info)
                        body = json.dumps(info).encode()
                        conn.send_headers(
                            ev.stream_id,
                            [
                                (":status", "200"),
                                ("content-type", "application/json"),
                                ("content-length", str(len(body))),
                            ],
                        )
                        conn.send_data(ev.stream_id, body, end_stream=True)
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        break
                writer.write(conn.data_to_send())
                await writer.drain()
        except Exception:  # noqa: S110 - a test server: a broken client connection just ends
            pass
        finally:
            writer.close()

    async def _stop(self) -> None:
        for c in reversed(self._cleanups):
            with contextlib.suppress(Exception):
                await c()


def _closer(srv: asyncio.Server) -> Callable[[], Any]:
    async def close() -> None:
        srv.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(srv.wait_closed(), 2)

    return close


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    """One set of loopback upstreams for the whole session (cleared before each use by PortcullisProc)."""
    u = Upstreams(tmp_path_factory.mktemp("upstreams")).start()
    yield u
    u.stop()


# ------------------------------------------------------------------------------------------- the proxy


@dataclass
class Reply:
    """An HTTP answer as a client saw it."""

    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class CurlResult:
    exit_code: int
    status: int | None
    headers: dict[str, str]
    body: bytes
    stderr: str

    def json(self) -> Any:
        return json.loads(self.body)


def base_config(u: Upstreams, folder: Path, **over: Any) -> dict[str, Any]:
    """A config for tests: loopback everything, the test names resolved statically, the test CA trusted."""
    cfg: dict[str, Any] = {
        # Real ports come from the command line (127.0.0.1:0) and the proxy.started event.
        "listen": "127.0.0.1:8080",
        "admin": {"listen": "127.0.0.1:9090", "token_env": "PORTCULLIS_TEST_ADMIN_TOKEN"},
        "rules": ["rules/"],
        "default_action": "deny",
        "mode": "enforce",
        "approvals": {
            "timeout": "5s",
            "hold": True,
            "store": "sqlite:///state/portcullis.db",
            "persist_to": "rules/approved.yaml",
        },
        "network": {
            "block_private": True,
            "allow_cidrs": [f"{PUBLIC_IP}/32", f"{OTHER_IP}/32"],
            "resolve": {
                "public.test": PUBLIC_IP,
                "api.public.test": PUBLIC_IP,
                "www.public.test": PUBLIC_IP,
                "deep.api.public.test": PUBLIC_IP,
                "other.test": OTHER_IP,
                "blocked.test": PUBLIC_IP,
                "approve.test": PUBLIC_IP,
            },
        },
        "tls": {"inspect": "auto", "ca_dir": "certs/", "upstream_ca": str(u.ca_pem)},
        "telemetry": {"log": {"format": "json"}, "metrics": True, "otlp": False},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


class PortcullisProc:
    """`portcullis run` in a subprocess (optionally inside a fresh network namespace with only lo up).

    Events (the JSON lines on stdout) are collected in `self.events`; stderr goes to `stderr.log`.
    """

    def __init__(
        self,
        folder: Path,
        u: Upstreams | None,
        rules: list[dict[str, Any]] | None = None,
        config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        netns: bool = False,
        extra_rule_files: dict[str, str] | None = None,
        validate_events: bool = True,
        workers: int | None = 1,
    ) -> None:
        self.folder = folder
        self.validate_events = validate_events
        self.workers = workers
        self.u = u
        self.netns = netns
        self.events: list[dict[str, Any]] = []
        self.raw_lines: list[str] = []  # every stdout line as printed (the event audit reads them)
        self._cond = threading.Condition()
        (folder / "rules").mkdir(parents=True, exist_ok=True)
        if u is not None and config is None:
            config = base_config(u, folder)
        self.config = config or {}
        self.config_path = folder / "portcullis.yaml"
        self.config_path.write_text(json.dumps(self.config, indent=1))
        self.rules_path = folder / "rules" / "main.yaml"
        self.write_rules(rules or [])
        for name, text in (extra_rule_files or {}).items():
            (folder / "rules" / name).write_text(text)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = self.admin_port = 0
        self.exit_code: int | None = None

    def write_rules(self, rules: list[dict[str, Any]], path: Path | None = None) -> None:
        tmp = (path or self.rules_path).with_suffix(".tmp")
        tmp.write_text(json.dumps({"rules": rules}, indent=1))
        os.replace(tmp, path or self.rules_path)

    # -- lifecycle
    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "addons.cli",
            "run",
            "--config",
            str(self.config_path),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            *(["--workers", str(self.workers)] if self.workers is not None else []),
        ]
        if self.netns:
            cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]
        return cmd

    def start(self, wait: bool = True) -> PortcullisProc:
        if self.u is not None:
            self.u.clear()
        self._stderr = open(self.folder / "stderr.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(),
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait:
            try:
                ev = self.wait_event("proxy.started", timeout=START_TIMEOUT)
            except BaseException:
                self.stop()  # never leak a half-started process
                raise
            self.port = int(ev["listen"][0].rsplit(":", 1)[1])
            self.admin_port = int(ev["admin"].rsplit(":", 1)[1])
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._take(line)
        with self._cond:
            self._cond.notify_all()

    def _take(self, line: bytes) -> None:
        """One stdout line: kept as text, and as an event when it is JSON (waiters are woken)."""
        with self._cond:
            self.raw_lines.append(line.decode("utf-8", "replace"))
        try:
            doc = json.loads(line)
        except ValueError:
            return
        with self._cond:
            self.events.append(doc)
            self._cond.notify_all()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return self.exit_code or 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.exit_code = self.proc.returncode
        self._reader.join(5)
        self._stderr.close()
        self.proc = None
        return self.exit_code

    def __enter__(self) -> PortcullisProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if exc[0] is None and self.validate_events:
            self.check_events()

    def check_events(self) -> None:
        """Every captured event must match the shipped JSON Schema of its type (ocsf/console: skipped)."""
        fmt = self.config.get("telemetry", {}).get("log", {}).get("format", "json")
        if fmt != "json":
            return
        from addons.telemetry.validate import validate_event

        bad = []
        for e in self.events:
            try:
                validate_event(e)
            except Exception as err:  # noqa: BLE001 - collect every mismatch, then fail once
                bad.append(f"{e.get('event')}: {err}")
        assert not bad, "events that do not match their schema:\n" + "\n".join(bad[:10])

    def stderr_text(self) -> str:
        return (self.folder / "stderr.log").read_text(errors="replace")

    # -- events
    def find(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        with self._cond:
            evs = list(self.events)
        return [e for e in evs if (event is None or e.get("event") == event) and _matches(e, match)]

    def wait_event(self, event: str, timeout: float = 10.0, count: int = 1, **match: Any) -> dict[str, Any]:
        """Wait until `count` events of this type (matching dotted-key fields) exist; return the last."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.events if e.get("event") == event and _matches(e, match)]
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None and not found):
                    raise AssertionError(
                        f"no {event} {match} within {timeout}s; stderr:\n{self.stderr_text()[-3000:]}"
                    )
                self._cond.wait(min(left, 0.2))

    def decisions(self, **match: Any) -> list[dict[str, Any]]:
        return self.find("egress.decision", **match)

    # -- clients
    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def curl(self, url: str, *args: str, timeout: float = 15.0) -> CurlResult:
        """curl through the proxy (test CA and proxy CA trusted); inside the netns when netns=True."""
        out = self.folder / f"curl-body-{time.monotonic_ns()}"
        cmd = [
            "curl",
            "-sS",
            "-x",
            self.proxy_url,
            "-D",
            "-",
            "-o",
            str(out),
            "--max-time",
            str(timeout),
            "--cacert",
            str(self.trust_bundle()),
            *args,
            url,
        ]
        p = subprocess.run(self.wrap(cmd), capture_output=True, timeout=timeout + 5, check=False)
        body = out.read_bytes() if out.exists() else b""
        with contextlib.suppress(OSError):
            out.unlink()
        status, headers = _last_head(p.stdout.decode("latin-1"))
        return CurlResult(p.returncode, status, headers, body, p.stderr.decode(errors="replace"))

    def wrap(self, cmd: list[str]) -> list[str]:
        """Run a client command in the proxy's network namespace when it has one."""
        if self.netns:
            assert self.proc is not None
            return ["nsenter", "-t", str(self.proc.pid), "-n", *cmd]
        return cmd

    def trust_bundle(self) -> Path:
        """The test upstream CA plus the proxy's interception CA, for clients."""
        bundle = self.folder / "client-trust.pem"
        if not bundle.exists():
            parts = [self.u.ca_pem.read_text()] if self.u is not None else []
            proxy_ca = self.folder / "certs" / "mitmproxy-ca-cert.pem"
            if proxy_ca.exists():
                parts.append(proxy_ca.read_text())
            bundle.write_text("\n".join(parts))
        return bundle

    def connect(self, timeout: float = 10.0) -> socket.socket:
        """A raw TCP connection to the proxy (not for netns mode)."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return s

    def raw(self, data: bytes, timeout: float = 10.0) -> Reply:
        """Send raw bytes on a fresh connection; read one response (from inside the netns if any)."""
        if self.netns:
            return self.raw_many([data], timeout)[0]
        with self.connect(timeout) as s:
            s.sendall(data)
            return read_reply(s)

    def raw_many(self, requests: list[bytes], timeout: float = 30.0) -> list[Reply]:
        """`raw()` for many requests (one fresh connection each) in one client process."""
        if not self.netns:
            return [self.raw(d) for d in requests]
        cmd = self.wrap([sys.executable, "-c", "import tests.harness as h; h._raw_main()", str(self.port)])
        payload = json.dumps([d.decode("latin-1") for d in requests]).encode()
        p = subprocess.run(cmd, input=payload, capture_output=True, cwd=REPO, timeout=timeout, check=True)
        return [
            Reply(d["status"], d["reason"], d["headers"], d["body"].encode("latin-1"))
            for d in json.loads(p.stdout)
        ]

    def connect_tunnel(
        self, authority: str, headers: str = "", timeout: float = 10.0
    ) -> tuple[socket.socket, Reply]:
        """CONNECT on a fresh connection; returns the socket (tunnel if 2xx) and the CONNECT reply."""
        s = self.connect(timeout)
        s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{headers}\r\n".encode())
        return s, read_reply(s, head_only_2xx=True)


def _raw_main() -> None:
    """`raw_many()` inside a network namespace: each request (JSON list on stdin) on its own
    connection to 127.0.0.1:argv[1]; the replies as a JSON list."""
    out = []
    for text in json.loads(sys.stdin.read()):
        with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as s:
            s.sendall(text.encode("latin-1"))
            r = read_reply(s, head_only_2xx=True)
        out.append(
            {"status": r.status, "reason": r.reason, "headers": r.headers, "body": r.body.decode("latin-1")}
        )
    print(json.dumps(out))


def _matches(e: dict[str, Any], match: dict[str, Any]) -> bool:
    for k, want in match.items():
        cur: Any = e
        for part in k.replace("__", ".").split("."):
            if not isinstance(cur, dict) or part not in cur:
                return False
            cur = cur[part]
        if cur != want:
            return False
    return True


def _last_head(text: str) -> tuple[int | None, dict[str, str]]:
    """The last response head in curl's -D output (after any CONNECT 200 / 100 Continue)."""
    blocks = [b for b in text.replace("\r\n", "\n").split("\n\n") if b.startswith("HTTP/")]
    if not blocks:
        return None, {}
    lines = blocks[-1].split("\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for ln in lines[1:]:
        if ":" in ln:
            k, v = ln.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


def read_reply(s: socket.socket, head_only_2xx: bool = False) -> Reply:
    """Read one HTTP/1.x response from a socket (Content-Length or until close)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a full response head: {buf!r}")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    _, code, *reason = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    status = int(code)
    if head_only_2xx and 200 <= status < 300:
        return Reply(status, reason[0] if reason else "", headers, rest)
    length = headers.get("content-length")
    if length is not None:
        while len(rest) < int(length):
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        body = rest[: int(length)]
    else:
        while chunk := s.recv(65536):
            rest += chunk
        body = rest
    return Reply(status, reason[0] if reason else "", headers, body)


def tls_client_hello(server_name: str | None) -> bytes:
    """A real TLS ClientHello record (for raw-socket SNI tests), made with no network."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def assert_denied(reply: Reply | CurlResult, reason: str, status: int = 403) -> dict[str, Any]:
    """Status, both X-Portcullis headers and the body's reason; returns the body."""
    assert reply.status == status, (reply.status, reply.headers, reply.body[:300])
    assert reply.headers.get("x-portcullis-decision") == "deny", reply.headers
    assert reply.headers.get("x-portcullis-reason") == reason, reply.headers
    body = json.loads(reply.body)
    assert body["reason"] == reason and body["error"] == "egress_denied", body
    return dict(body)


def is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback
