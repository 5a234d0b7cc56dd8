"""mitm_compat.parsing: mitmproxy's real HTTP layer, driven with its own events, reading requests the
way the wrappers make it (bounded heads, empty lines, the hardened authority parser, a denial before
the body), and the request target's raw bytes."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1, _http2
from mitmproxy.test import taddons, tflow

from addons.pipeline.requestform import HEAD_TIMEOUT_S
from addons.proxy import mitm_compat
from addons.proxy.responses import error_body, h2_error_headers, http1_error_response


def test_the_raw_target_is_the_bytes_mitmproxy_read() -> None:
    r = tflow.treq(method=b"GET", path=b"/a%20b?q", authority=b"public.test:80")
    assert mitm_compat.raw_target(r) == (b"GET", b"/a%20b?q", b"public.test:80")


class Driven:
    """A regular-mode HttpLayer on one client connection, fed bytes; hooks answered in-process."""

    def __init__(self, requestheaders: Callable[[http.HTTPFlow], None] | None = None) -> None:
        self.refusals: list[mitm_compat.Refusal] = []
        mitm_compat.install(http1_error_response, error_body, h2_error_headers, self.refusals.append)
        self._tctx = taddons.context(Proxyserver())
        tctx = self._tctx.__enter__()
        tctx.options.update(stream_large_bodies="1m")
        self.client = tflow.tclient_conn()
        self.client.state = ConnectionState.OPEN
        ctx = Context(self.client, tctx.options)
        ctx.server = tflow.tserver_conn()
        ctx.server.state = ConnectionState.CLOSED
        self.layer = http_layers.HttpLayer(ctx, http_layers.HTTPMode.regular)
        self.requestheaders = requestheaders
        self.flows: list[http.HTTPFlow] = []
        self.commands: list[Any] = []
        self.feed(events.Start())

    def close(self) -> None:
        self._tctx.__exit__(None, None, None)

    def feed(self, event: events.Event) -> list[Any]:
        queue, out = [event], []
        while queue:
            for cmd in self.layer.handle_event(queue.pop(0)):
                out.append(cmd)
                if isinstance(cmd, commands.StartHook):
                    if cmd.name == "requestheaders":
                        self.flows.append(cmd.flow)  # type: ignore[attr-defined]
                        if self.requestheaders is not None:
                            self.requestheaders(cmd.flow)  # type: ignore[attr-defined]
                    queue.insert(0, events.HookCompleted(cmd))
        self.commands += out
        return out

    def send(self, data: bytes) -> list[Any]:
        return self.feed(events.DataReceived(self.client, data))

    def sent(self) -> bytes:
        return b"".join(c.data for c in self.commands if isinstance(c, commands.SendData))

    def upstream(self) -> list[Any]:
        return [c for c in self.commands if isinstance(c, commands.OpenConnection)]

    def closes(self) -> list[Any]:
        return [c for c in self.commands if type(c) is commands.CloseConnection]


@pytest.fixture
def driven() -> Any:
    made: list[Driven] = []

    def make(requestheaders: Callable[[http.HTTPFlow], None] | None = None) -> Driven:
        made.append(Driven(requestheaders))
        return made[-1]

    yield make
    for d in made:
        d.close()


GET = b"GET http://public.test/a HTTP/1.1\r\nHost: public.test\r\n\r\n"


@pytest.mark.parametrize(
    "chunks", [[b"\r\n" + GET], [b"\r\n\n\r\n" + GET], [b"\r\n", GET], [b"\r\n", b"\r\n" + GET]]
)
def test_empty_lines_before_the_request_line_are_skipped(driven: Any, chunks: list[bytes]) -> None:
    d = driven()
    for c in chunks:
        d.send(c)
    assert [f.request.url for f in d.flows] == ["http://public.test/a"] and d.refusals == []


def test_an_empty_line_between_keep_alive_requests_is_skipped(driven: Any) -> None:
    # The first request is answered by the hook (a response), the second follows an extra CRLF.
    d = driven(lambda f: setattr(f, "response", http.Response.make(204)))
    d.send(GET + b"\r\n" + GET.replace(b"/a", b"/b"))
    assert [f.request.path for f in d.flows] == ["/a", "/b"]


def _fields(size: int) -> bytes:
    """Header field lines of exactly `size` bytes (line ends included)."""
    line = b"X-Pad: " + b"p" * (size - 9) + b"\r\n"
    assert len(line) == size
    return line


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /" + b"a" * (1 << 20), 414),  # a request line that never ends
        (b"GET /" + b"a" * 8188 + b" HTTP/1.1\r\n", 414),  # 8193 bytes
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"b" * (1 << 20), 431),  # a header that never ends
        (b"GET / HTTP/1.1\r\n" + _fields(65536 - 8) + b"Host: h\r\n\r\n", 431),  # 65537 bytes of fields
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 20000, 431),  # many small ones, no end in sight
    ],
    ids=["line-endless", "line-8193", "field-endless", "fields-65537", "many-fields"],
)
def test_a_head_over_the_limits_is_refused_while_it_arrives(driven: Any, head: bytes, status: int) -> None:
    d = driven()
    for i in range(0, len(head), 16384):  # as a socket delivers it
        d.send(head[i : i + 16384])
        if d.refusals:
            break
    assert d.flows == [] and d.upstream() == []  # no hook saw it, nothing went anywhere
    (r,) = d.refusals  # one refusal: one bad_request decision
    assert r.status == status and r.request is None
    answer = d.sent()
    assert answer.startswith(b"HTTP/1.1 %d " % status) and b'"reason":"bad_request"' in answer
    half = [c for c in d.commands if isinstance(c, commands.CloseTcpConnection)]
    assert len(half) == 1 and half[0].half_close  # the client can still send, and reads the answer
    # What still comes is dropped, not buffered, until DRAIN_LIMIT, then the connection is closed.
    layer = d.layer.connections[d.client]
    for _ in range(mitm_compat.DRAIN_LIMIT // 65536 - 4):  # (what was buffered already counts too)
        d.send(b"z" * 65536)
        assert len(layer.buf) == 0 and not d.closes()
    for _ in range(8):
        d.send(b"z" * 65536)
    assert len(d.closes()) == 1 and len(d.refusals) == 1


@pytest.mark.parametrize(
    "head",
    [
        b"GET /" + b"a" * 8176 + b" HTTP/1.1\r\nHost: public.test\r\n\r\n",  # an 8192-byte request line
        b"GET / HTTP/1.1\r\nHost: public.test\r\n" + _fields(65536 - 19) + b"\r\n",  # 65536 bytes of fields
    ],
    ids=["line-8192", "fields-65536"],
)
def test_a_head_at_the_limits_is_read(driven: Any, head: bytes) -> None:
    d = driven()
    for i in range(0, len(head), 16384):
        d.send(head[i : i + 16384])
    assert len(d.flows) == 1 and d.refusals == []


def test_a_closed_client_still_ends_a_refused_connection(driven: Any) -> None:
    d = driven()
    d.send(b"GET /" + b"a" * 9000)
    d.feed(events.ConnectionClosed(d.client))
    assert len(d.refusals) == 1 and len(d.closes()) == 1


OVERFLOW = b"xn--hk0sxn--mmheR-k" + b"0" * 15 + b"1siie"  # a valid label length; CPython overflows on it


def test_an_authority_the_idna_codec_cannot_decode_is_a_value_error() -> None:
    from mitmproxy.net import check
    from mitmproxy.net.http import http1, url

    with pytest.raises(OverflowError):  # the codec itself (why this hardening exists)
        OVERFLOW.decode("idna")
    mitm_compat.harden_request_parsing()
    mitm_compat.harden_request_parsing()  # idempotent
    with pytest.raises(ValueError, match="OverflowError"):
        url.parse_authority(OVERFLOW + b":1", check=True)
    assert url.parse_authority(OVERFLOW.decode() + ":1", check=False) == (OVERFLOW.decode() + ":1", None)
    assert check.is_valid_host(OVERFLOW) is False and check.is_valid_host(OVERFLOW.decode()) is False
    for line in (b"GET http://%s:1/ HTTP/1.1" % OVERFLOW, b"CONNECT %s:1 HTTP/1.1" % OVERFLOW):
        with pytest.raises(ValueError):
            http1.read_request_head([line, b"Host: x"])
    assert url.parse_authority(b"public.test:80", check=True) == ("public.test", 80)  # unchanged otherwise


@pytest.mark.parametrize(
    "line",
    [
        b"GET http://%s:1/ HTTP/1.1" % OVERFLOW,
        b"CONNECT %s:1 HTTP/1.1" % OVERFLOW,
        b"GET http://a.%s.test/ HTTP/1.1" % OVERFLOW,
    ],
)
def test_such_a_request_is_answered_400_and_reported_once(driven: Any, line: bytes) -> None:
    d = driven()
    d.send(line + b"\r\nHost: x\r\n\r\n")
    (r,) = d.refusals
    assert r.status == 400 and d.sent().startswith(b"HTTP/1.1 400 ") and d.flows == []


def _deny(flow: http.HTTPFlow) -> None:
    flow.response = http.Response.make(403, b"denied\n")
    mitm_compat.answer_at_once(flow)


@pytest.mark.parametrize("size", [5, 3 << 20])  # under and over stream_large_bodies
def test_a_denial_is_sent_before_the_body_and_the_body_goes_nowhere(driven: Any, size: int) -> None:
    d = driven(_deny)
    d.send(b"POST http://blocked.test/x HTTP/1.1\r\nHost: blocked.test\r\nContent-Length: %d\r\n\r\n" % size)
    answer = d.sent()
    assert answer.startswith(b"HTTP/1.1 403 ") and answer.endswith(b"denied\n")
    assert b"connection: close" in answer.lower() and not d.closes()
    for i in range(0, size, 65536):  # the body is read and dropped: nothing buffered, nothing upstream
        d.send(b"b" * min(65536, size - i))
    assert d.upstream() == [] and d.sent() == answer and d.flows[0].request.raw_content in (None, b"")
    assert len(d.closes()) == 1  # closed once the body is over (Connection: close)


def test_expect_100_continue_gets_the_denial_and_no_continue(driven: Any) -> None:
    d = driven(_deny)
    d.send(
        b"POST http://blocked.test/x HTTP/1.1\r\nHost: blocked.test\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5\r\n\r\n"
    )
    assert d.sent().startswith(b"HTTP/1.1 403 ") and b"100 Continue" not in d.sent()
    d.feed(events.ConnectionClosed(d.client))  # the client leaves without a body
    assert d.upstream() == [] and len(d.closes()) == 1


def test_an_allowed_streamed_request_still_goes_upstream(driven: Any) -> None:
    d = driven(lambda f: setattr(f.request, "stream", True))
    d.send(b"POST http://public.test/x HTTP/1.1\r\nHost: public.test\r\nContent-Length: 5\r\n\r\n")
    assert [type(c) for c in d.upstream()] == [commands.OpenConnection]  # the patch left it alone


def test_the_request_reader_is_what_the_wrappers_expect() -> None:
    src = inspect.getsource(_http1.Http1Server.read_headers)
    assert "request_head = self.buf.maybe_extract_lines()" in src  # h11 returns [] for an empty line
    assert "FIXME: protect against header size DoS" in src  # no limit of its own (else drop ours)
    assert "self.state = self.read_headers" in inspect.getsource(_http1.Http1Connection.mark_done)
    assert "self.buf += event.data" in inspect.getsource(_http1.Http1Connection._handle_event)
    # The readers reach the authority parser and the host check through their modules' attributes.
    from mitmproxy.net import check
    from mitmproxy.net.http import url
    from mitmproxy.net.http.http1 import read

    assert "url.parse_authority(authority, check=True)" in inspect.getsource(read._read_request_line)
    assert "url.parse_authority(" in inspect.getsource(_http2.parse_h2_request_headers)
    assert "is_valid_host(host)" in inspect.getsource(url.parse_authority)  # the original (__wrapped__)
    assert 'host_bytes.decode("idna")' in inspect.getsource(check.is_valid_host)  # what overflows
    # A response set in requestheaders with a streamed body reaches start_request_stream, which
    # refuses it unpatched; the patch answers with send_response and ends with flow_done.
    wait = inspect.getsource(http_layers.HttpStream.state_wait_for_request_headers)
    assert wait.index("yield HttpRequestHeadersHook(self.flow)") < wait.index('headers.get("expect", "")')
    assert "if self.flow.request.stream and not event.end_stream:" in wait
    assert "yield from self.start_request_stream()" in wait
    stream = inspect.getsource(http_layers.HttpStream)
    assert "def state_errored(self, _)" in stream and "def flow_done" in stream
    layer_src = inspect.getsource(http_layers.HttpLayer.event_to_child)
    assert "stream = self.streams[command.event.stream_id]" in layer_src and "except KeyError:" in layer_src


@pytest.fixture
def short_head_timeout() -> Any:
    mitm_compat.set_head_timeout(0.05)
    yield 0.05
    mitm_compat.set_head_timeout(HEAD_TIMEOUT_S)


def test_a_head_still_arriving_after_the_head_timeout_is_refused_408(
    driven: Any, short_head_timeout: float
) -> None:
    d = driven()
    d.send(b"GET http://public.test/a HTTP/1.1\r\n")
    time.sleep(2 * short_head_timeout)
    d.send(b"H")  # slow-loris: a byte now and then
    assert d.flows == [] and d.upstream() == []
    (r,) = d.refusals
    assert r.status == 408 and "took longer than" in r.message
    assert d.sent().startswith(b"HTTP/1.1 408 ") and b'"reason":"bad_request"' in d.sent()
    half = [c for c in d.commands if isinstance(c, commands.CloseTcpConnection)]
    assert len(half) == 1 and half[0].half_close


def test_each_keep_alive_head_has_its_own_clock(driven: Any, short_head_timeout: float) -> None:
    d = driven(lambda f: setattr(f, "response", http.Response.make(204)))
    d.send(GET)
    time.sleep(2 * short_head_timeout)  # idle between requests is the idle timeout's business
    d.send(GET.replace(b"/a", b"/b"))
    assert [f.request.path for f in d.flows] == ["/a", "/b"] and d.refusals == []
