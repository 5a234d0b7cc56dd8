"""The processes bench_compare.py measures: nginx upstream, Portcullis, mitmdump, Squid; their CPU and RSS.

Not a test and never run in CI. Everything listens on loopback and lives in one temp folder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
UPSTREAM = "127.0.0.2"
NAME = "bench.test"
HOLD_NAME = "hold.test"  # resolves (network.resolve) to the upstream; every request for it waits for a person
BIG = 100 * 1024 * 1024  # the bulk transfer's size (bytes)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout}s")


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def make_certs(d: Path) -> None:
    """A throwaway CA and a server certificate for bench.test (never leaves the temp dir)."""
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Bench CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={NAME}",
        "-keyout", str(d / "srv.key"), "-out", str(d / "srv.csr"))
    (d / "ext.cnf").write_text(
        f"subjectAltName=DNS:{NAME}\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
    )
    run("openssl", "x509", "-req", "-in", str(d / "srv.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
        str(d / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile", str(d / "ext.cnf"),
        "-out", str(d / "srv.pem"))


def start_nginx(d: Path, http_port: int, tls_port: int) -> subprocess.Popen[bytes]:
    """1 worker: `ok\\n` for every path, and /big (100 MB) for the bulk transfer."""
    www = d / "www"
    www.mkdir(exist_ok=True)
    with open(www / "big", "wb") as f:
        f.truncate(BIG)  # sparse: costs no disk
    conf = d / "nginx.conf"
    conf.write_text(f"""
worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/nginx.err warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  sendfile on;
  server {{ listen {UPSTREAM}:{http_port} backlog=4096; location / {{ return 200 "ok\\n"; }} }}
  server {{ listen {UPSTREAM}:{tls_port} ssl backlog=4096; ssl_certificate {d}/srv.pem;
           ssl_certificate_key {d}/srv.key;
           location = /big {{ root {www}; }}
           location / {{ return 200 "ok\\n"; }} }}
}}
""")
    p = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(d)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(UPSTREAM, http_port)
    wait_port(UPSTREAM, tls_port)
    return p


def start_squid(d: Path, port: int, http_port: int, tls_port: int,
                workers: int = 1) -> subprocess.Popen[bytes]:
    """Squid, no cache, no access log; `workers N` (SMP: a master, a coordinator and N kids) when N > 1."""
    sd = d / "squid"
    sd.mkdir(parents=True)
    os.chmod(sd, 0o777)
    conf = sd / "squid.conf"
    conf.write_text(f"""
http_port 127.0.0.1:{port}
acl bench dstdomain {NAME}
acl benchports port {http_port} {tls_port}
http_access allow bench benchports
http_access deny all
cache deny all
access_log none
cache_log {sd}/cache.log
pid_filename {sd}/squid.pid
coredump_dir {sd}
workers {workers}
max_filedescriptors 65536
shutdown_lifetime 0 seconds
""")
    # -N (no daemon) also means no SMP kids: with workers > 1 the master stays in the foreground instead.
    args = ["squid", "-N", "-f", str(conf)] if workers == 1 else ["squid", "--foreground", "-f", str(conf)]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_port("127.0.0.1", port, timeout=30)
    if workers > 1:
        _wait_children(p.pid, workers, 30)
    return p


def start_mitmdump(d: Path, port: int, passthrough: bool) -> subprocess.Popen[bytes]:
    args = [str(VENV_BIN / "mitmdump"), "-q", "--listen-host", "127.0.0.1", "-p", str(port),
            "--set", f"confdir={d / 'mitm'}"]
    if passthrough:
        args += ["--ignore-hosts", ".*"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port("127.0.0.1", port)
    return p


@dataclass(frozen=True)
class PortcullisSetup:
    """A config folder for one Portcullis variant (its rules and approval settings)."""

    folder: Path
    rules: int  # rules in force, the bench rule included
    hold: bool


def rule_text(i: int) -> str:
    """bench_policy.py's generated rule shapes (exact names, wildcards, CIDRs, ports, methods/paths)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_policy import rule_text as gen

    return gen(i)


def portcullis_setup(d: Path, name: str, rules: int = 10, hold: bool = False) -> PortcullisSetup:
    """The bench rule (allow bench.test) plus rules - 1 generated ones; with `hold`, an approval rule
    for hold.test (held, 10 minutes) and many client addresses allowed to wait at once."""
    pd = d / f"portcullis-{name}"
    (pd / "rules").mkdir(parents=True, exist_ok=True)
    (pd / "rules" / "00-bench.yaml").write_text(
        f"rules:\n  - name: bench\n    action: allow\n    hosts: [{NAME}]\n"
        + (f"  - name: hold\n    action: approval\n    hosts: [{HOLD_NAME}]\n" if hold else "")
    )
    if rules > 1:
        (pd / "rules" / "10-generated.yaml").write_text(
            "rules:\n" + "".join(rule_text(i) for i in range(rules - 1))
        )
    resolve = f'resolve: {{"{HOLD_NAME}": "{UPSTREAM}"}}' if hold else "resolve: {}"
    (pd / "portcullis.yaml").write_text(f"""
rules: [rules/]
default_action: deny
approvals: {{store: "sqlite:///state/p.db", persist_to: null, hold: true, timeout: 10m}}
network: {{allow_cidrs: ["{UPSTREAM}/32"], {resolve}}}
tls: {{ca_dir: certs/}}
""")
    return PortcullisSetup(pd, rules, hold)


def portcullis_supports_workers() -> bool:
    out = subprocess.run([str(VENV_BIN / "portcullis"), "run", "--help"], capture_output=True, text=True)
    return "--workers" in out.stdout + out.stderr


def start_portcullis(setup: PortcullisSetup, port: int, admin: int, workers: int | None = None,
                     env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    pd = setup.folder
    for stale in (pd / "state").glob("p.db*"):
        stale.unlink()  # pending approvals from the last run would be restored
    log = open(pd / "events.jsonl", "wb")  # noqa: SIM115 - lives as long as the process
    args = [str(VENV_BIN / "portcullis"), "run", "--config", str(pd / "portcullis.yaml"),
            "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"]
    if workers is not None:
        args += ["--workers", str(workers)]
    p = subprocess.Popen(args, stdout=log, stderr=open(pd / "stderr.log", "wb"),  # noqa: SIM115
                         env=env, start_new_session=True)
    wait_port("127.0.0.1", port, timeout=120)
    # The port answers as soon as the socket is bound (the kernel queues connections): with --workers
    # N that is before any worker accepts. Measure only once the proxy says it is up.
    wait_started(pd / "events.jsonl", p, timeout=120)
    if workers and workers > 1:
        _wait_children(p.pid, workers, 60)
    return p


def wait_started(events: Path, p: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b'"event":"proxy.started"' in events.read_bytes():
            return
        if p.poll() is not None:
            raise RuntimeError(f"portcullis exited ({p.returncode}) before proxy.started")
        time.sleep(0.05)
    raise RuntimeError(f"no proxy.started in {events} after {timeout}s")


def stop(p: subprocess.Popen[bytes] | None) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        with_tree = tree(p.pid)
        for pid in with_tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        p.wait()


# ---- CPU and memory of a process and its descendants -------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from 'state' on (the name may hold spaces)


def tree(root: int) -> list[int]:
    """root and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(int(st[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(root: int) -> float:
    """User + system CPU of root and its live descendants, reaped children included (utime, stime,
    cutime, cstime of /proc/<pid>/stat)."""
    total = 0
    for pid in tree(root):
        st = _stat(pid)
        if st is not None:
            total += sum(int(x) for x in st[11:15])  # utime stime cutime cstime
    return total / CLK_TCK


def rss_bytes(root: int) -> int:
    """VmRSS summed over root and its descendants."""
    total = 0
    for pid in tree(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def _wait_children(pid: int, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(tree(pid)) < n + 1:
        time.sleep(0.1)
