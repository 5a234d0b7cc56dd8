"""A real rsyslogd on loopback for the syslog sink tests: its own config, ports, work folder and
output file; no system daemon, no /dev/log. What it received is read back from its output file,
one JSON object per message with the fields rsyslog's RFC 5424 parser found."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

RSYSLOGD = shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd" if Path("/usr/sbin/rsyslogd").exists() else None)
GTLS_MODULES = [Path(f"/usr/lib/{d}/lmnsd_gtls.so")
                for d in ("x86_64-linux-gnu/rsyslog", "aarch64-linux-gnu/rsyslog", "rsyslog")]
PROBE_APP = "rsyslog-probe"

# Every field rsyslog parsed out of the message, as JSON (jsonf: one object per line).
_TEMPLATE = """
template(name="fields" type="list" option.jsonf="on") {
  property(outname="pri" name="pri" format="jsonf")
  property(outname="facility" name="syslogfacility" format="jsonf")
  property(outname="severity" name="syslogseverity" format="jsonf")
  property(outname="version" name="protocol-version" format="jsonf")
  property(outname="timestamp" name="timereported" dateFormat="rfc3339" format="jsonf")
  property(outname="hostname" name="hostname" format="jsonf")
  property(outname="app_name" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="sd" name="structured-data" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
  property(outname="input" name="inputname" format="jsonf")
  property(outname="from" name="fromhost-ip" format="jsonf")
}
"""


def need_rsyslog(transport: str = "tcp") -> str:
    if RSYSLOGD is None:
        pytest.skip("rsyslogd is not installed (Debian package rsyslog; `./dev test` installs it as root)")
    if transport == "tls" and not any(p.exists() for p in GTLS_MODULES):
        pytest.skip("rsyslog's TLS driver is not installed "
                    "(Debian package rsyslog-gnutls; `./dev test` installs it)")
    return RSYSLOGD


def free_port(kind: int) -> int:
    """A free port for a server that binds it later (rsyslogd): drawn below the kernel's ephemeral
    range, so the source port of some other test's outgoing connection cannot take it meanwhile."""
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(200):
        port = random.randrange(10_000, max(10_001, low))
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class Rsyslog:
    """rsyslogd -n with one input (udp | tcp | tls) on 127.0.0.1:port; `received()` parses its output."""

    def __init__(self, folder: Path, transport: str, pki: dict[str, Path] | None = None,
                 client_auth: bool = False) -> None:
        self.binary = need_rsyslog(transport)
        self.folder = folder
        self.transport = transport
        self.pki = pki
        folder.mkdir(parents=True, exist_ok=True)
        self.out = folder / "received.jsonl"
        self.port = free_port(socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM)
        self.conf = folder / "rsyslog.conf"
        self.conf.write_text(self._config(client_auth))
        self.proc: subprocess.Popen[bytes] | None = None
        self._probes = 0

    def _config(self, client_auth: bool) -> str:
        work = self.folder / "work"
        work.mkdir(exist_ok=True)
        lines = []
        if self.transport == "tls":
            assert self.pki is not None
            peers_ca = self.pki["client_ca"] if client_auth else self.pki["server_ca"]
            lines.append(
                f'global(workDirectory="{work}" maxMessageSize="64k" DefaultNetstreamDriver="gtls"\n'
                f'  DefaultNetstreamDriverCAFile="{peers_ca}"\n'
                f'  DefaultNetstreamDriverCertFile="{self.pki["server_cert"]}"\n'
                f'  DefaultNetstreamDriverKeyFile="{self.pki["server_key"]}")'
            )
            mode = 'StreamDriver.AuthMode="x509/certvalid"' if client_auth else 'StreamDriver.AuthMode="anon"'
            lines.append(f'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" {mode})')
            lines.append(f'input(type="imtcp" address="127.0.0.1" port="{self.port}")')
        else:
            lines.append(f'global(workDirectory="{work}" maxMessageSize="64k")')
            mod = "imudp" if self.transport == "udp" else "imtcp"
            lines.append(f'module(load="{mod}")')
            lines.append(f'input(type="{mod}" address="127.0.0.1" port="{self.port}")')
        lines.append(_TEMPLATE)
        # rsyslog's own messages (start, errors) go to their own file, for the failure message.
        internal = self.folder / "internal.log"
        lines.append(f'if $inputname == "rsyslogd" then {{ action(type="omfile" file="{internal}") stop }}')
        lines.append(f'action(type="omfile" file="{self.out}" template="fields")')
        return "\n".join(lines) + "\n"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Rsyslog:
        assert self.proc is None
        self._log = open(self.folder / "stdout.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [self.binary, "-n", "-f", str(self.conf), "-i", str(self.folder / "rsyslogd.pid")],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        self._log.close()

    def __enter__(self) -> Rsyslog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- readiness: a probe message that comes out at the other end
    def _wait_ready(self, timeout: float) -> None:
        self._probes += 1
        marker = f"ready-{self._probes}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"rsyslogd exited with {self.proc.returncode}:\n{self.diagnostics()}")
            try:
                self.send_raw(f"<14>1 - - {PROBE_APP} - - - {marker}".encode())
            except OSError:
                time.sleep(0.1)
                continue
            if self._wait_for(lambda: any(r["msg"] == marker for r in self.received(probes=True)), 1.0):
                return
        raise AssertionError(f"rsyslogd did not come up on {self.address}:\n{self.diagnostics()}")

    def send_raw(self, msg: bytes) -> None:
        """One message as an ordinary client would send it (the probe)."""
        if self.transport == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.sendto(msg, ("127.0.0.1", self.port))
            return
        frame = str(len(msg)).encode() + b" " + msg
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            if self.transport == "tls":
                assert self.pki is not None
                ctx = ssl.create_default_context(cafile=str(self.pki["server_ca"]))
                if client_auth_probe := self.pki.get("client_cert"):
                    ctx.load_cert_chain(client_auth_probe, self.pki["client_key"])
                with ctx.wrap_socket(s, server_hostname="public.test") as t:
                    t.sendall(frame)
                    with contextlib.suppress(OSError):
                        t.unwrap()  # rsyslog closes without answering close_notify
            else:
                s.sendall(frame)

    @staticmethod
    def _wait_for(pred: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.05)
        return pred()

    # -- what arrived
    def received(self, probes: bool = False) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        rows = [json.loads(x) for x in self.out.read_text(errors="replace").splitlines() if x.strip()]
        return rows if probes else [r for r in rows if r.get("app_name") != PROBE_APP]

    def wait_received(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """At least `count` messages (probes excluded) within `timeout`, else an AssertionError."""
        if not self._wait_for(lambda: len(self.received()) >= count, timeout):
            raise AssertionError(
                f"rsyslogd received {len(self.received())} of {count} messages:\n{self.diagnostics()}")
        return self.received()

    def diagnostics(self) -> str:
        parts = []
        for name in ("stdout.log", "internal.log"):
            p = self.folder / name
            if p.exists():
                parts.append(f"--- {name}\n{p.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts) or "(rsyslogd wrote nothing)"


def make_syslog_pki(folder: Path) -> dict[str, Path]:
    """A receiver PKI (CA, server cert for public.test) and a client PKI (CA, clientAuth cert).

    The certificates carry Subject/Authority Key Identifiers: Python 3.13 verifies with
    VERIFY_X509_STRICT (RFC 5280), which refuses a chain without them.
    """
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    out: dict[str, Path] = {}

    def pem(name: str, data: bytes) -> None:
        out[name] = folder / f"{name}.pem"
        out[name].write_bytes(data)

    def issue(tag: str, cn: str, eku: Any) -> None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Portcullis Test {tag} CA")])
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(
                  digital_signature=True, content_commitment=False, key_encipherment=False,
                  data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                  encipher_only=False, decipher_only=False), critical=True)
              .add_extension(ca_ski, critical=False)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (x509.CertificateBuilder().subject_name(subject)
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        pem(f"{tag}_ca", ca.public_bytes(serialization.Encoding.PEM))
        pem(f"{tag}_cert", cert.public_bytes(serialization.Encoding.PEM))
        pem(f"{tag}_key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))

    issue("server", "public.test", ExtendedKeyUsageOID.SERVER_AUTH)
    issue("client", "portcullis-client.test", ExtendedKeyUsageOID.CLIENT_AUTH)
    return out
