"""Support for the adversarial suite: one proxy per class, cases, and the three oracles.

Every case is judged on
  1. what the client was told (status, X-Portcullis-Decision/-Reason, or a closed connection),
  2. what arrived upstream (the harness upstreams and the recording servers of tests/recording.py):
     for a refused case nothing at all may arrive; for any case, a forbidden marker (the denied
     host's name, a smuggled header) must not appear in anything that arrived,
  3. what was logged: the egress.decision events of exactly this case (a barrier request after the
     case closes the window), e.g. exactly one deny with the expected reason.
"""

from __future__ import annotations

import itertools
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness import PUBLIC_IP, PortcullisProc, Reply, Upstreams, base_config, read_reply
from tests.recording import RecordingServer, free_port_pair

# Names every adversarial proxy resolves statically (all to the "public" loopback upstream address).
NAMES = [
    "public.test",
    "api.public.test",
    "www.public.test",
    "blocked.test",
    "approve.test",
    "wild.test",
    "a.wild.test",
    "b.a.wild.test",
    "evilwild.test",
    "wild.test.evil.test",
    "a.wild.test.evil.test",
    "apex.test",
    "x.apex.test",
    "xapex.test",
    "xn--bcher-kva.test",
    "evil.test",
    "x.public.test",
    "public.test.evil.test",
    "evilpublic.test",
    "barrier.test",
]
BARRIER_RULE = {"name": "barrier", "action": "deny", "hosts": ["barrier.test"]}

_seq = itertools.count(1)


@dataclass
class Recorders:
    """The recording upstreams (session-wide): raw sinks, HTTP/1 and TLS HTTP/1 recorders."""

    server: RecordingServer
    raw: int  # 127.0.0.2: records, never answers
    http: int  # 127.0.0.2: HTTP/1, answers every head
    tls: int  # 127.0.0.2: TLS (public.test cert) + HTTP/1
    upgrade: int  # 127.0.0.2: HTTP/1 that answers any Upgrade with 101, then records raw bytes
    http3: int  # 127.0.0.3: HTTP/1 (the address a deny rule names)
    raw3: int  # 127.0.0.3: raw sink
    loop: int  # HTTP/1 on 127.0.0.2, 127.0.0.1 and ::1, the same port: a loopback bypass is recorded

    def mark(self) -> dict[int, int]:
        return self.server.mark()

    def arrived(self, mark: dict[int, int]) -> bytes:
        return self.server.bytes_since(mark)

    def conns(self, mark: dict[int, int]) -> list[Any]:
        return self.server.since(mark)


def start_recorders(u: Upstreams) -> Recorders:
    s = RecordingServer()
    cert = (u.pki["public_cert"], u.pki["public_key"])
    loop = free_port_pair("127.0.0.2", "127.0.0.1")
    for host in ("127.0.0.2", "127.0.0.1", "::1"):
        try:
            s.start("http", host=host, port=loop)
        except OSError:
            if host != "::1":  # a host without IPv6 loopback: the v6 spellings just find nothing
                raise
    return Recorders(
        loop=loop,
        server=s,
        raw=s.start("raw"),
        http=s.start("http"),
        tls=s.start("tls", cert=cert),
        upgrade=s.start("http", upgrade=True),
        http3=s.start("http", host="127.0.0.3"),
        raw3=s.start("raw", host="127.0.0.3"),
    )


def adv_config(u: Upstreams, folder: Path, **over: Any) -> dict[str, Any]:
    cfg = base_config(u, folder, **over)
    for n in NAMES:
        cfg["network"]["resolve"].setdefault(n, PUBLIC_IP)
    return cfg


class Replies:
    """HTTP/1 responses read one after another from one socket, keeping what a read took too much
    (pipelined answers arrive back to back; `read_reply` alone would drop the next one)."""

    def __init__(self, s: socket.socket | ssl.SSLSocket) -> None:
        self.s = s
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.s.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        self.buf += chunk

    def next(self) -> Reply:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        _, code, *reason = lines[0].split(" ", 2)
        headers = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            self._fill()
        body, self.buf = self.buf[:n], self.buf[n:]
        return Reply(int(code), reason[0] if reason else "", headers, body)

    def statuses(self, count: int) -> list[int | None]:
        out: list[int | None] = []
        for _ in range(count):
            try:
                out.append(self.next().status)
            except (ConnectionError, OSError, ValueError):
                out.append(None)
        return out


@dataclass
class Outcome:
    """What the client saw."""

    reply: Reply | None = None
    closed: bool = False  # the proxy closed the connection without an HTTP answer
    timeout: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> int | None:
        return self.reply.status if self.reply else None

    def summary(self) -> str:
        if self.reply is not None:
            h = self.reply.headers
            return (
                f"{self.reply.status} decision={h.get('x-portcullis-decision')} "
                f"reason={h.get('x-portcullis-reason')}"
            )
        return "timeout" if self.timeout else "closed"


class Adv:
    """One proxy under attack, with the oracles."""

    def __init__(self, proc: PortcullisProc, rec: Recorders, u: Upstreams) -> None:
        self.p = proc
        self.rec = rec
        self.u = u

    # ---- clients
    def send(self, data: bytes | list[bytes], timeout: float = 5.0, pause: float = 0.05) -> Outcome:
        """Bytes (or segments, with a pause between) on a fresh connection; one HTTP/1 answer."""
        with socket.create_connection(("127.0.0.1", self.p.port), timeout=timeout) as s:
            return self.exchange(s, data, pause)

    @staticmethod
    def exchange(s: socket.socket | ssl.SSLSocket, data: bytes | list[bytes], pause: float = 0.05) -> Outcome:
        segs = data if isinstance(data, list) else [data]
        try:
            for i, seg in enumerate(segs):
                if i:
                    time.sleep(pause)
                s.sendall(seg)
        except OSError:
            return Outcome(closed=True)
        try:
            return Outcome(reply=read_reply(s))
        except (ConnectionError, ssl.SSLError):
            return Outcome(closed=True)
        except TimeoutError:
            return Outcome(timeout=True)
        except OSError:
            return Outcome(closed=True)

    def tunnel(self, authority: str, headers: str = "", timeout: float = 5.0) -> tuple[socket.socket, Reply]:
        return self.p.connect_tunnel(authority, headers=headers, timeout=timeout)

    def tls_tunnel(
        self, authority: str, server_name: str, alpn: list[str] | None = None
    ) -> ssl.SSLSocket:
        s, rep = self.tunnel(authority)
        assert rep.status == 200, (rep.status, rep.body[:200])
        ctx = ssl.create_default_context(cafile=str(self.p.trust_bundle()))
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx.wrap_socket(s, server_hostname=server_name)

    # ---- the event oracle
    def mark(self) -> tuple[int, dict[int, int], int]:
        return len(self.p.events), self.rec.mark(), len(self.u.seen())

    def barrier(self) -> int:
        """A request after the case, on a new connection: once its decision is logged, the case's
        decisions are too. Returns the index of the barrier's event."""
        n = next(_seq)
        r = self.p.raw(f"GET http://barrier.test:1/b/{n} HTTP/1.1\r\nHost: barrier.test:1\r\n\r\n".encode())
        assert r.status == 403, r.status
        self.p.wait_event("egress.decision", **{"request.path": f"/b/{n}"})
        with self.p._cond:
            for i in range(len(self.p.events) - 1, -1, -1):
                e = self.p.events[i]
                if e.get("event") == "egress.decision" and (e.get("request") or {}).get("path") == f"/b/{n}":
                    return i
        raise AssertionError("barrier event vanished")

    def window(self, mark: tuple[int, dict[int, int], int], settle: float = 0.05) -> Window:
        time.sleep(settle)  # let relayed bytes of a closed case land (bounded; the check is on bytes)
        end = self.barrier()
        with self.p._cond:
            events = list(self.p.events[mark[0] : end])
        return Window(
            events=events,
            arrived=self.rec.arrived(mark[1]),
            conns=self.rec.conns(mark[1]),
            seen=self.u.seen()[mark[2] :],
        )


@dataclass
class Window:
    """Everything that happened between a case's start and its barrier."""

    events: list[dict[str, Any]]
    arrived: bytes  # every byte the recording servers received
    conns: list[Any]
    seen: list[dict[str, Any]]  # requests the harness upstreams answered

    @property
    def decisions(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == "egress.decision"]

    def nothing_arrived(self) -> bool:
        return not self.arrived and not self.seen and not any(c for c in self.conns if c.data)

    def contains(self, marker: bytes) -> bool:
        m = marker.lower()
        if m in self.arrived.lower():
            return True
        return any(m.decode("latin-1") in str(r).lower() for r in self.seen)


class ForbiddenArrival(AssertionError):
    """Something the policy forbids reached an upstream (the oracle that matters most)."""


class Mismatch(AssertionError):
    """The answer or the logged decisions differ from the expectation (nothing forbidden arrived)."""


def _ok(cond: object, msg: object, exc: type[AssertionError] = Mismatch) -> None:
    if not cond:
        raise exc(msg)


def expect_refused(w: Window, out: Outcome, reason: str, *, status: int | str | None = 403,
                   layer: str | None = None, forbid: bytes | None = None) -> dict[str, Any]:
    """A refusal: the answer, nothing upstream, and exactly one deny decision with `reason` (a tunnel
    refused on its first bytes: its CONNECT allow + this deny). `status` None: the connection is
    closed without an HTTP answer (after a CONNECT 200); "any": an HTTP/2 refusal, either a
    deny answer with `reason` or a closed connection."""
    _ok(w.nothing_arrived(), f"FORBIDDEN BYTES ARRIVED: {w.arrived[:300]!r} {w.seen[:2]}", ForbiddenArrival)
    if forbid is not None:
        _ok(not w.contains(forbid), f"FORBIDDEN {forbid!r} ARRIVED", ForbiddenArrival)
    if status is None:
        _ok(out.reply is None or out.reply.status == 200, out.summary())
    elif status == "any":
        if out.reply is not None:
            h = out.reply.headers
            _ok((h.get("x-portcullis-decision"), h.get("x-portcullis-reason")) == ("deny", reason),
                out.summary())
    else:
        _ok(out.reply is not None, f"expected {status} {reason}, got {out.summary()}")
        assert out.reply is not None
        h = out.reply.headers
        want = (400, 403) if status == "4xx" else (status,)
        _ok(out.reply.status in want and (h.get("x-portcullis-decision"), h.get("x-portcullis-reason"))
            == ("deny", reason), (f"expected {status} deny {reason}", out.summary(), out.reply.body[:300]))
    denies = [d for d in w.decisions if d["decision"] == "deny"]
    _ok(len(denies) == 1, f"expected exactly one deny decision ({reason}), got {_short(w.decisions)}")
    d = denies[0]
    _ok(d["reason"] == reason, f"expected a {reason} decision, got {_short(w.decisions)}")
    if layer is not None:
        _ok(d["layer"] == layer, _short(w.decisions))
    others = [x for x in w.decisions if x is not d]
    # The only other decision allowed in a refused case: the CONNECT allow of the tunnel it came through.
    _ok(all(x["decision"] == "allow" and x["layer"] == "connect" for x in others),
        f"unexpected extra decisions: {_short(w.decisions)}")
    return d


def expect_allowed(w: Window, out: Outcome, *, forbid: bytes | None = None, status: int = 200,
                   decisions: int = 1) -> None:
    """Let through: the answer is the upstream's, `decisions` allow decisions, nothing forbidden arrived."""
    if forbid is not None:
        _ok(not w.contains(forbid), f"FORBIDDEN {forbid!r} ARRIVED: {w.arrived[:400]!r}", ForbiddenArrival)
    _ok(out.reply is not None and out.reply.status == status, f"expected {status}, got {out.summary()}")
    _ok([d["decision"] for d in w.decisions] == ["allow"] * decisions,
        f"expected {decisions} allow decision(s), got {_short(w.decisions)}")


def _short(decisions: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(d["decision"], d["reason"], d["layer"], d["destination"]["host"]) for d in decisions]


def issue8(cls: str, arrives: bool = False) -> Any:
    """A known issue-8 failure. Unless `arrives` (the class IS forbidden bytes reaching upstream),
    only a wrong answer or log counts as the expected failure: forbidden bytes arriving still fail."""
    return pytest.mark.xfail(strict=True, reason=f"issue 8: {cls}",
                             raises=AssertionError if arrives else Mismatch)


def bypass(what: str, arrives: bool = True) -> Any:
    """A bug found here (see the report): forbidden bytes arrive (`arrives`), or a wrong log/answer."""
    return pytest.mark.xfail(strict=True, reason=f"bypass: {what}",
                             raises=AssertionError if arrives else Mismatch)


def case(id_: str, *values: Any, marks: Any = ()) -> Any:
    return pytest.param(*values, id=id_, marks=marks)


def proxy_fixture(
    name: str, rules: list[dict[str, Any]], config: Callable[[Upstreams, Path], dict[str, Any]] | None = None,
    env: dict[str, str] | None = None,
) -> Callable[..., Iterator[Adv]]:
    """A module-scoped fixture: one proxy for a whole class table."""

    @pytest.fixture(scope="module")
    def fixture(upstreams: Upstreams, recorders: Recorders,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Adv]:
        folder = tmp_path_factory.mktemp(name)
        cfg = config(upstreams, folder) if config else adv_config(upstreams, folder)
        with PortcullisProc(folder, upstreams, rules=[*rules, BARRIER_RULE], config=cfg, env=env) as p:
            yield Adv(p, recorders, upstreams)

    return fixture


def get(host: str, port: int, path: str = "/", headers: str = "", host_header: str | None = None,
        method: str = "GET") -> bytes:
    """An absolute-form request whose Host names the same authority unless told otherwise."""
    hh = host_header if host_header is not None else f"{host}:{port}"
    hline = f"Host: {hh}\r\n" if hh != "" else ""
    return f"{method} http://{host}:{port}{path} HTTP/1.1\r\n{hline}{headers}\r\n".encode()


def judge(w: Window, out: Outcome, expect: str, forbid: bytes | None = b"blocked.test") -> None:
    """`allow[:status]`, `deny:<reason>[:<status>|:any]`, or `refuse:<reason>` (tunnel closed after
    its CONNECT was allowed); `forbid` must not appear in anything that arrived upstream."""
    kind, _, rest = expect.partition(":")
    if kind == "allow":
        expect_allowed(w, out, forbid=forbid, status=int(rest or 200))
    elif kind == "deny":
        reason, _, st = rest.partition(":")
        default = {"proxy_auth": 407, "bad_request": "4xx"}.get(reason, 403)  # malformed: 400 or 403
        status: int | str = default if not st else (st if st in ("any", "4xx") else int(st))
        expect_refused(w, out, reason, status=status, forbid=forbid)
    elif kind == "refuse":
        expect_refused(w, out, rest, status=None, forbid=forbid)
    else:
        raise ValueError(expect)


def run(adv: Adv, fn: Callable[[], Outcome], expect: str, forbid: bytes | None = b"blocked.test") -> Window:
    """One case: mark, act, close the window with a barrier, judge."""
    m = adv.mark()
    out = fn()
    w = adv.window(m)
    judge(w, out, expect, forbid)
    return w


def h2_request(t: ssl.SSLSocket, headers: list[tuple[str, str]], timeout: float = 5.0) -> Outcome:
    """One HTTP/2 request (headers sent verbatim, no client-side validation) on a negotiated socket."""
    import h2.config
    import h2.connection
    import h2.events

    cfg = h2.config.H2Configuration(
        client_side=True, header_encoding="utf-8", validate_outbound_headers=False,
        normalize_outbound_headers=False, validate_inbound_headers=False,
    )
    conn = h2.connection.H2Connection(cfg)
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=True)
    t.settimeout(timeout)
    status, hdrs, body = 0, {}, b""
    try:
        t.sendall(conn.data_to_send())
        while data := t.recv(65536):
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    hdrs = {str(k): str(v) for k, v in ev.headers}
                    status = int(hdrs[":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    return Outcome(reply=Reply(status, "", hdrs, body))
                elif isinstance(ev, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    if status:
                        return Outcome(reply=Reply(status, "", hdrs, body))
                    return Outcome(closed=True)
            t.sendall(conn.data_to_send())
    except (OSError, ssl.SSLError):
        pass
    return Outcome(reply=Reply(status, "", hdrs, body)) if status else Outcome(closed=True)
