"""Loopback servers for the credential-injection tests: upstreams that record every header they receive
(and never echo one back), a smart-HTTP git server and a simple package index that require a token.

`Recorder`: TLS on 127.0.0.2 (the harness's public.test / *.public.test certificate), TLS on 127.0.0.3
(other.test) and plain HTTP on 127.0.0.2. Every request is kept as {server, method, path, host, headers,
body}; `.../redirect?to=URL` answers 302 to URL. A `git` server wraps `git http-backend` (CGI) and a `pypi`
server serves /simple/<name>/ and a wheel; both answer 401 unless the Authorization header holds
the expected Basic token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import os
import ssl
import subprocess
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.harness import OTHER_IP, PUBLIC_IP, Upstreams

NAME_KEY = web.AppKey("name", str)  # which upstream an aiohttp app is


class Recorder:
    """Recording upstreams in a background event loop; `start()`, then `stop()`."""

    def __init__(self, u: Upstreams, folder: Path) -> None:
        self.u = u
        self.folder = folder
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.tls_port = self.other_port = self.http_port = self.git_port = self.pypi_port = 0
        self.git_token = self.pypi_token = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="recorder", daemon=True)
        self._runners: list[web.AppRunner] = []

    def start(self) -> Recorder:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(20)
        return self

    def stop(self) -> None:
        self._audit()

        async def down() -> None:
            for r in self._runners:
                with contextlib.suppress(Exception):
                    await r.cleanup()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(down(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def clear(self) -> None:
        self._audit()
        with self.lock:
            self.seen.clear()

    def _audit(self) -> None:
        """Hand what arrived to the suite's audit: every upstream request must be covered by a logged
        decision that let it through (tests/telemetry/audit_plugin.py)."""
        from tests.telemetry import audit_plugin

        with self.lock:
            audit_plugin.UPSTREAM_SEEN.extend(
                {k: r[k] for k in ("server", "method", "path", "host")} for r in self.seen
            )

    def requests(self, pred: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.seen if pred is None or pred(r)]

    def with_header(self, value: str) -> list[dict[str, Any]]:
        """Every recorded request carrying `value` in any header or its body."""
        return self.requests(
            lambda r: (
                any(value in v for v in r["headers"].values())
                or value.encode() in r["body"]
                or value in r["path"]
            )
        )

    # ---- servers

    def _ctx(self, tag: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.u.pki[tag + "_cert"], self.u.pki[tag + "_key"])
        return ctx

    async def _site(self, app: web.Application, host: str, ctx: ssl.SSLContext | None) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, 0, ssl_context=ctx)
        await site.start()
        self._runners.append(runner)
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def _start(self) -> None:
        def app(name: str) -> web.Application:
            a = web.Application(client_max_size=64 * 1024 * 1024)
            a[NAME_KEY] = name
            a.router.add_route("*", "/{tail:.*}", self._record)
            return a

        self.tls_port = await self._site(app("tls"), PUBLIC_IP, self._ctx("public"))
        self.other_port = await self._site(app("other"), OTHER_IP, self._ctx("other"))
        self.http_port = await self._site(app("http"), PUBLIC_IP, None)

    async def _record(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        entry = {
            "server": request.app[NAME_KEY],
            "method": request.method,
            "path": request.path_qs,
            "host": request.headers.get("Host"),
            "headers": dict(request.headers),
            "body": body,
        }
        with self.lock:
            self.seen.append(entry)
            n = len(self.seen)
        if request.path.endswith("/redirect"):
            raise web.HTTPFound(location=request.query["to"])
        return web.json_response({"ok": True, "n": n})  # never echoes a header or the body

    # ---- git over smart HTTP, and a package index, each requiring a token

    def start_git(self, repo_root: Path, token: str) -> None:
        self.git_token = token
        asyncio.run_coroutine_threadsafe(self._start_git(repo_root), self._loop).result(20)

    async def _start_git(self, root: Path) -> None:
        a = web.Application(client_max_size=64 * 1024 * 1024)
        a.router.add_route("*", "/{tail:.*}", lambda r: self._git(r, root))
        self.git_port = await self._site(a, PUBLIC_IP, self._ctx("public"))

    def _authorized(self, request: web.Request, token: str, user: str, name: str) -> bool:
        want = "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()
        self._note(request, name)
        return request.headers.get("Authorization") == want

    def _note(self, request: web.Request, name: str) -> None:
        with self.lock:
            self.seen.append(
                {
                    "server": name,
                    "method": request.method,
                    "path": request.path_qs,
                    "host": request.headers.get("Host"),
                    "headers": dict(request.headers),
                    "body": b"",
                }
            )

    async def _git(self, request: web.Request, root: Path) -> web.StreamResponse:
        if not self._authorized(request, self.git_token, "x-access-token", "git"):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="git"'})
        body = await request.read()
        env = {
            "GIT_PROJECT_ROOT": str(root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": request.path,
            "QUERY_STRING": request.query_string,
            "REQUEST_METHOD": request.method,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": "agent",
            "REMOTE_ADDR": "127.0.0.1",
            "PATH": os.environ.get("PATH", ""),
            "HTTP_GIT_PROTOCOL": request.headers.get("Git-Protocol", ""),
        }
        if request.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = request.headers["Content-Encoding"]
        out = await asyncio.to_thread(
            subprocess.run,
            ["git", "http-backend"],
            input=body,
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        head, _, payload = out.stdout.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = out.stdout.partition(b"\n\n")
        status, headers = 200, {}
        for line in head.decode("latin-1").splitlines():
            k, _, v = line.partition(":")
            if k.lower() == "status":
                status = int(v.strip().split()[0])
            elif k:
                headers[k.strip()] = v.strip()
        return web.Response(status=status, body=payload, headers=headers)

    def start_pypi(self, token: str, user: str = "__token__") -> str:
        """A simple index with one package (`injtest`, a pure wheel); returns the wheel's file name."""
        self.pypi_token = token
        wheel_name, wheel = make_wheel("injtest", "1.0")
        asyncio.run_coroutine_threadsafe(self._start_pypi(user, wheel_name, wheel), self._loop).result(20)
        return wheel_name

    async def _start_pypi(self, user: str, wheel_name: str, wheel: bytes) -> None:
        digest = hashlib.sha256(wheel).hexdigest()

        async def handle(request: web.Request) -> web.StreamResponse:
            if not self._authorized(request, self.pypi_token, user, "pypi"):
                return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="pypi"'})
            if request.path.rstrip("/") in ("/simple/injtest", "/simple/injtest/"):
                link = f"<a href='/files/{wheel_name}#sha256={digest}'>{wheel_name}</a>"
                html = f"<html><body>{link}</body></html>"
                return web.Response(text=html, content_type="text/html")
            if request.path == f"/files/{wheel_name}":
                return web.Response(body=wheel, content_type="application/octet-stream")
            return web.Response(status=404)

        a = web.Application()
        a.router.add_route("*", "/{tail:.*}", handle)
        self.pypi_port = await self._site(a, PUBLIC_IP, self._ctx("public"))


def make_wheel(name: str, version: str) -> tuple[str, bytes]:
    """A minimal valid pure-Python wheel (one module), built in memory."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": b"VALUE = 42\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={h},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return f"{name}-{version}-py3-none-any.whl", buf.getvalue()


def make_repo(root: Path) -> Path:
    """A bare repository `root/acme/tools.git` with one commit on main."""
    work = root / "work"
    bare = root / "acme" / "tools.git"
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@x",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@x",
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(root),
    }
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True, env=env)
    (work / "README").write_text("hello from the loopback forge\n")
    subprocess.run(["git", "-C", str(work), "add", "README"], check=True, env=env)
    subprocess.run(["git", "-C", str(work), "commit", "-q", "-m", "first"], check=True, env=env)
    bare.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True, env=env)
    return bare
