"""Loopback servers that real package tools can talk to, over TLS with the harness's test CA.

One aiohttp app on two sites: public.test (127.0.0.2) and other.test (127.0.0.3), with
certificates of its own CA (`ca_pem`). It serves
  - /simple/tinypkg/ and /packages/tinypkg-0.1.0-py3-none-any.whl   a PEP 503 index with one wheel (pip)
  - /tinypkg and /tinypkg/-/tinypkg-1.0.0.tgz                        an npm registry with one package
  - /repo.git/...                                                     git smart HTTP (`git http-backend`)
  - anything else                                                     a JSON echo (curl, requests, httpx)
and records (site, method, path) of every request.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import ssl
import subprocess
import tarfile
import threading
import zipfile
from pathlib import Path

from aiohttp import web

SITE_KEY = web.AppKey("site", str)  # which upstream an aiohttp app is

WHEEL = "tinypkg-0.1.0-py3-none-any.whl"
TARBALL = "tinypkg-1.0.0.tgz"


def tiny_wheel() -> bytes:
    files = {
        "tinypkg/__init__.py": b"VALUE = 42\n",
        "tinypkg-0.1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1.0\n",
        "tinypkg-0.1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: portcullis-tests\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("tinypkg-0.1.0.dist-info/RECORD,,")
    files["tinypkg-0.1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def tiny_tarball() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, text in (
            ("package/package.json", json.dumps({"name": "tinypkg", "version": "1.0.0", "main": "index.js"})),
            ("package/index.js", "module.exports = 42;\n"),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_git_repo(root: Path) -> Path:
    """A bare repository `root/repo.git` with one commit holding README.txt."""
    work = root / "work"
    env = {
        **os.environ,
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(root),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }
    for cmd in (["git", "init", "-q", "-b", "main", str(work)],):
        subprocess.run(cmd, check=True, env=env, capture_output=True)
    (work / "README.txt").write_text("served by git http-backend\n")
    subprocess.run(["git", "-C", str(work), "add", "."], check=True, env=env, capture_output=True)
    subprocess.run(
        ["git", "-C", str(work), "commit", "-q", "-m", "one"], check=True, env=env, capture_output=True
    )
    subprocess.run(
        ["git", "clone", "-q", "--bare", str(work), str(root / "repo.git")],
        check=True,
        env=env,
        capture_output=True,
    )
    return root / "repo.git"


LEAVES = {"public": ["public.test"], "other": ["other.test"]}


def make_pki(folder: Path, leaves: dict[str, list[str]] | None = None) -> dict[str, Path]:
    """A CA and leaf certificates (default: public.test and other.test), with the key identifiers
    that strict verifiers (Python >= 3.13's VERIFY_X509_STRICT) require of a chain."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Portcullis Test Tools CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
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
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": folder / "tools-ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for tag, names in (leaves or LEAVES).items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        out[f"{tag}_cert"], out[f"{tag}_key"] = folder / f"{tag}.crt", folder / f"{tag}.key"
        out[f"{tag}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{tag}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return out


class ToolServer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pki = make_pki(folder / "pki")
        self.ca_pem = self.pki["ca"]
        self.wheel = tiny_wheel()
        self.tarball = tiny_tarball()
        self.git_root = make_git_repo(folder / "git").parent
        self.seen: list[tuple[str, str, str]] = []
        self.ports: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="toolserver", daemon=True)
        self._runners: list[web.AppRunner] = []

    def start(self) -> ToolServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(15)
        return self

    def stop(self) -> None:
        async def stop() -> None:
            for r in self._runners:
                await r.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def saw(self, site: str, prefix: str) -> bool:
        with self._lock:
            return any(s == site and p.startswith(prefix) for s, _, p in self.seen)

    def base(self, site: str) -> str:
        return f"https://{site}:{self.ports[site]}"

    async def _start(self) -> None:
        for site, ip, tag in (("public.test", "127.0.0.2", "public"), ("other.test", "127.0.0.3", "other")):
            app = web.Application(client_max_size=16 * 1024 * 1024)
            app[SITE_KEY] = site
            app.router.add_route("*", "/{tail:.*}", self._handle)
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(self.pki[tag + "_cert"], self.pki[tag + "_key"])
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            tcp = web.TCPSite(runner, ip, 0, ssl_context=ctx)
            await tcp.start()
            self._runners.append(runner)
            self.ports[site] = int(tcp._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        site = request.app[SITE_KEY]
        with self._lock:
            self.seen.append((site, request.method, request.path))
        base = f"https://{request.host}"
        path = request.path
        if path.rstrip("/") == "/simple/tinypkg":
            sha = hashlib.sha256(self.wheel).hexdigest()
            link = f'<a href="/packages/{WHEEL}#sha256={sha}">{WHEEL}</a>'
            html = f"<!DOCTYPE html><html><body>{link}</body></html>"
            return web.Response(text=html, content_type="text/html")
        if path == f"/packages/{WHEEL}":
            return web.Response(body=self.wheel, content_type="application/octet-stream")
        if path == "/tinypkg":
            integrity = "sha512-" + base64.b64encode(hashlib.sha512(self.tarball).digest()).decode()
            doc = {
                "name": "tinypkg",
                "dist-tags": {"latest": "1.0.0"},
                "versions": {
                    "1.0.0": {
                        "name": "tinypkg",
                        "version": "1.0.0",
                        "main": "index.js",
                        "dist": {
                            "tarball": f"{base}/tinypkg/-/{TARBALL}",
                            "integrity": integrity,
                            "shasum": hashlib.sha1(self.tarball).hexdigest(),
                        },
                    }
                },
            }  # noqa: S324 - npm's format
            return web.json_response(doc)
        if path == f"/tinypkg/-/{TARBALL}":
            return web.Response(body=self.tarball, content_type="application/octet-stream")
        if path.startswith("/repo.git/"):
            return await self._git(request)
        return web.json_response({"site": site, "method": request.method, "path": path})

    async def _git(self, request: web.Request) -> web.Response:
        body = await request.read()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.git_root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "HOME": str(self.folder),
            "REQUEST_METHOD": request.method,
            "PATH_INFO": request.path,
            "QUERY_STRING": request.query_string,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": "127.0.0.1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
        }
        for header in ("Git-Protocol", "Content-Encoding"):
            if header in request.headers:
                env["HTTP_" + header.upper().replace("-", "_")] = request.headers[header]
        proc = await asyncio.create_subprocess_exec(
            "git",
            "http-backend",
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, _err = await asyncio.wait_for(proc.communicate(body), 30)
        head, _, payload = out.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = out.partition(b"\n\n")
        status, headers = 200, {}
        for line in head.decode("latin-1").splitlines():
            k, _, v = line.partition(":")
            if k.lower() == "status":
                status = int(v.split()[0])
            elif k:
                headers[k.strip()] = v.strip()
        return web.Response(status=status, body=payload, headers=headers)


def start(folder: Path) -> ToolServer:
    return ToolServer(folder).start()
