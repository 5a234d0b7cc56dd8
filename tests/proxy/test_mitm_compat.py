"""What addons/proxy/mitm_compat.py relies on in mitmproxy's internals. Each test names one
assumption; a mitmproxy upgrade that changes it fails here, loudly, before any bypass can. The relays
built on mitmproxy's layers are driven with its own events. (That `portcullis run` refuses an
unsupported mitmproxy: tests/proxy/e2e/test_lifecycle.py.)"""

from __future__ import annotations

import inspect
import socket
from collections.abc import Callable
from typing import Any

import pytest
from mitmproxy import http, version
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.connection import ConnectionState
from mitmproxy.options import Options
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1, _http2, _http_h2
from mitmproxy.proxy.layers.tls import ClientTLSLayer, ServerTLSLayer
from mitmproxy.test import taddons, tflow

from addons.proxy import mitm_compat
from addons.proxy.mitm_compat import speed as mitm_speed
from addons.proxy.responses import error_body, h2_error_headers, http1_error_response


def test_the_installed_mitmproxy_is_supported():
    assert mitm_compat.check_version() is None


@pytest.mark.parametrize("fake", ["12.3.0", "13.0.1", "11.1.3"])
def test_an_unsupported_mitmproxy_names_what_to_install(monkeypatch, fake):
    monkeypatch.setattr(version, "VERSION", fake)
    msg = mitm_compat.check_version()
    assert msg is not None and fake in msg and "mitmproxy>=12.2,<12.3" in msg


def test_http1_error_pages_come_from_the_module_level_builder():
    # The swap replaces _http1.make_error_response; every call site must look it up by that name.
    assert inspect.signature(_http1.make_error_response).parameters.keys() == {"status_code", "message"}
    read = inspect.getsource(inspect.unwrap(_http1.Http1Server.read_headers))
    assert "make_error_response(400, str(e))" in read
    send = inspect.getsource(inspect.unwrap(_http1.Http1Server.send))
    assert "make_error_response(status, event.message)" in send
    # ... and only in the protocol-error branch of send, the one the tracked send is used for.
    assert send.index("isinstance(event, ResponseProtocolError)") < send.index("make_error_response(")
    assert send.count("make_error_response(") == 1


def test_http2_error_pages_come_from_format_error_with_three_fixed_headers():
    src = inspect.getsource(_http2.Http2Connection._handle_event)
    assert "format_error(status, event.message)" in src
    assert '(b"server", version.MITMPROXY.encode())' in src and '(b"content-type", b"text/html")' in src
    assert list(inspect.signature(_http_h2.BufferedH2Connection.send_headers).parameters)[:3] == [
        "self",
        "stream_id",
        "headers",
    ]


def test_the_wrapped_connection_handlers_are_generators_on_the_server_side():
    assert inspect.isgeneratorfunction(_http1.Http1Connection._handle_event)
    assert inspect.isgeneratorfunction(inspect.unwrap(_http1.Http1Server.read_headers))
    assert inspect.isgeneratorfunction(inspect.unwrap(_http1.Http1Server.send))
    assert inspect.isgeneratorfunction(inspect.unwrap(_http2.Http2Server._handle_event))
    # HTTP/1 events reach send (HttpEvent) and read_headers (the state) only through these names.
    handle = inspect.getsource(_http1.Http1Connection._handle_event)
    assert "yield from self.send(event)" in handle and "yield from self.state(event)" in handle
    assert "self.state = self.read_headers" in inspect.getsource(_http1.Http1Connection.mark_done)
    # The HTTP/1 server keeps what it parsed on `self.request` (the refusal names its host).
    assert "self.request = http1.read_request_head(" in inspect.getsource(_http1.Http1Server.read_headers)
    assert _http2.Http2Server.__init__.__code__.co_varnames[:2] == ("self", "context")


def test_http2_connection_errors_go_through_protocol_error():
    pe = _http2.Http2Connection.protocol_error
    assert inspect.isgeneratorfunction(pe)
    assert list(inspect.signature(pe).parameters)[:2] == ["self", "message"]
    assert "self.protocol_error(" in inspect.getsource(_http2.Http2Server.handle_h2_event)
    assert "self.protocol_error(" in inspect.getsource(_http2.Http2Connection.handle_h2_event)


def test_invalid_requests_fire_requestheaders_with_flow_error_set_first():
    # The addon skips deciding when flow.error is set: mitmproxy answers (and the reporter logs) it.
    src = inspect.getsource(http_layers.HttpStream.check_invalid)
    assert src.index("self.flow.error = flow.Error(err)") < src.index("HttpRequestHeadersHook(self.flow)")
    assert "validate_request(" in src


def test_installed_builders_answer_json_and_report_only_with_a_running_connection():
    seen: list[object] = []
    for _ in range(2):  # idempotent: wrapping twice would report twice
        mitm_compat.install(http1_error_response, error_body, h2_error_headers, seen.append)
    page = _http1.make_error_response(400, "bad")
    assert page.startswith(b"HTTP/1.1 400 ") and b'"reason":"bad_request"' in page
    assert seen == []  # no connection layer is running here: nothing to attribute it to
    assert _http2.format_error(502, "x").startswith(b"{")  # type: ignore[attr-defined]
    # Only the steps that build pages are tracked: a tunnel's relayed bytes pass untouched.
    assert "_handle_event" not in vars(_http1.Http1Server)
    assert inspect.unwrap(_http1.Http1Server.read_headers) is not _http1.Http1Server.read_headers


def test_mitmproxys_debug_typechecks_are_what_is_dropped():
    from mitmproxy.http import MessageData, Request

    mitm_compat.install(http1_error_response, error_body, h2_error_headers, lambda r: None)
    original = inspect.unwrap(MessageData.__post_init__)
    assert original is not MessageData.__post_init__  # dropped ...
    src = inspect.getsource(original)
    # ... and it only checked
    assert "typecheck.check_option_type" in src and "for field in fields(self)" in src
    # mitmproxy defines it only in debug mode (python without -O): what -O would drop.
    assert "if __debug__:" in inspect.getsource(MessageData)
    mitm_speed.skip_debug_typechecks()  # idempotent
    assert inspect.unwrap(MessageData.__post_init__) is original
    r = Request.make("GET", "http://example.com/x", b"", {"a": "b"})
    assert r.host == "example.com" and r.headers["a"] == "b"


# ---- mitm_speed: the planned hook dispatch -----------------------------------------------------------


def test_mitmproxys_hook_dispatch_is_what_the_planned_one_reproduces():
    from mitmproxy import addonmanager

    mitm_speed.install()
    trigger = inspect.getsource(inspect.unwrap(addonmanager.AddonManager.trigger_event))
    assert "for i in self.chain:" in trigger and "with safecall():" in trigger
    assert "await self.invoke_addon(i, event)" in trigger and "except exceptions.AddonHalt:" in trigger
    lifecycle = inspect.getsource(inspect.unwrap(addonmanager.AddonManager.handle_lifecycle))
    assert "await self.trigger_event(event)" in lifecycle
    assert "if isinstance(message, flow.Flow):" in lifecycle and "hooks.UpdateHook([message])" in lifecycle
    hooks_of = inspect.getsource(addonmanager.AddonManager._iter_hooks)
    assert "for a in traverse([addon]):" in hooks_of and "getattr(a, event.name, None)" in hooks_of
    assert "isinstance(func, types.ModuleType)" in hooks_of and "not callable" in hooks_of
    invoke = inspect.getsource(addonmanager.AddonManager.invoke_addon)
    assert "res = func(*event.args())" in invoke and "inspect.isawaitable(res)" in invoke
    safecall = inspect.getsource(addonmanager.safecall)
    assert "except (exceptions.AddonHalt, exceptions.OptionsError):" in safecall
    assert "logger.error(" in safecall
    # The chain changes only by add (appends), remove and clear (new lists): the plan's key sees both.
    assert "self.chain.append(" in inspect.getsource(addonmanager.AddonManager.add)
    assert "self.chain = [" in inspect.getsource(addonmanager.AddonManager.remove)
    assert "self.chain = []" in inspect.getsource(addonmanager.AddonManager.clear)


class _Recorder:
    def __init__(self, name: str, calls: list[str], fail: type[BaseException] | None = None,
                 is_async: bool = False) -> None:
        self.name, self.calls, self.fail, self.is_async = name, calls, fail, is_async

    def requestheaders(self, f):
        if self.is_async:
            return self._async(f)
        self._hit(f)
        return None

    async def _async(self, f):
        self._hit(f)

    def _hit(self, f):
        self.calls.append(f"{self.name}:{f.id}")
        if self.fail is not None:
            raise self.fail("boom")


class _Updates:
    def __init__(self, calls):
        self.calls = calls

    def update(self, flows):
        self.calls.append(f"update:{len(flows)}")


class _Odd:
    import json as requestheaders  # a module named like a hook: skipped, as mitmproxy does


class _Broken:
    requestheaders = 3  # not callable: an error, logged, then the next addon runs


async def _dispatch(addons, planned: bool, caplog):
    from mitmproxy import addonmanager, hooks, master, options
    from mitmproxy.proxy.layers.http import HttpRequestHeadersHook
    from mitmproxy.test import tflow

    m = master.Master(options.Options())
    m.addons.add(*addons)
    f = tflow.tflow()
    caplog.clear()
    if planned:
        await m.addons.handle_lifecycle(HttpRequestHeadersHook(f))
    else:  # mitmproxy's own, unpatched
        await inspect.unwrap(addonmanager.AddonManager.handle_lifecycle)(m.addons, HttpRequestHeadersHook(f))
    await m.addons.trigger_event(hooks.DoneHook())
    return f.id, [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize("planned", [True, False])
async def test_the_planned_dispatch_calls_what_mitmproxy_calls(planned, caplog):
    from mitmproxy import exceptions

    mitm_speed.install()
    calls: list[str] = []
    addons = [_Recorder("a", calls), _Odd(), _Recorder("b", calls, RuntimeError, is_async=True), _Broken(),
              _Recorder("c", calls), _Updates(calls), _Recorder("halt", calls, exceptions.AddonHalt),
              _Recorder("never", calls)]
    fid, errors = await _dispatch(addons, planned, caplog)
    assert calls == [f"a:{fid}", f"b:{fid}", f"c:{fid}", f"halt:{fid}", "update:1"]
    assert any("Addon error: boom" in e for e in errors) and any("not callable" in e for e in errors)


async def test_the_plan_follows_the_chain_and_nested_addons_keep_mitmproxys_walk(caplog):
    from mitmproxy import master, options
    from mitmproxy.proxy.layers.http import HttpRequestHeadersHook
    from mitmproxy.test import tflow

    mitm_speed.install()
    calls: list[str] = []
    m = master.Master(options.Options())
    first = _Recorder("first", calls)
    m.addons.add(first)
    f = tflow.tflow()
    await m.addons.handle_lifecycle(HttpRequestHeadersHook(f))
    m.addons.add(_Recorder("added", calls))
    await m.addons.handle_lifecycle(HttpRequestHeadersHook(f))
    m.addons.remove(first)
    await m.addons.handle_lifecycle(HttpRequestHeadersHook(f))
    assert calls == [f"first:{f.id}", f"first:{f.id}", f"added:{f.id}", f"added:{f.id}"]
    assert mitm_speed.handlers(m.addons, "update") == []  # nobody handles update: not dispatched

    class Parent:
        def __init__(self):
            self.addons = [_Recorder("child", calls)]

    m.addons.add(Parent())
    assert mitm_speed.handlers(m.addons, "requestheaders") is None  # scripts nest addons: mitmproxy's walk
    calls.clear()
    await m.addons.handle_lifecycle(HttpRequestHeadersHook(f))
    assert calls == [f"added:{f.id}", f"child:{f.id}"]
# -- the relays: mitmproxy's TCP/TLS layers, driven with its own events ---------------------------------


class Counts:
    def __init__(self) -> None:
        self.bytes_up = 0
        self.bytes_down = 0
        self.refusals: list[str] = []
        self.on_refused: Callable[[str], None] | None = self.refusals.append


class Watch:
    """Refuses the client bytes that contain b"evil"; done once the server said b"done"."""

    def __init__(self) -> None:
        self.done = False
        self.seen: list[bytes] = []

    def client(self, data: bytes) -> str | None:
        self.seen.append(data)
        return "evil bytes" if b"evil" in data else None

    def server(self, data: bytes) -> None:
        self.done = b"done" in data


def open_context() -> Context:
    ctx = Context(tflow.tclient_conn(), Options())
    ctx.server = tflow.tserver_conn()
    ctx.server.state = ConnectionState.OPEN
    ctx.server.timestamp_start = 1.0
    return ctx


def run(gen: Any) -> list[Any]:
    """Every command a layer yields for one event (none of them block here)."""
    out: list[Any] = []
    try:
        cmd = next(gen)
        while True:
            out.append(cmd)
            cmd = gen.send(None)
    except StopIteration:
        return out


def test_the_counting_relay_relays_and_counts_each_direction() -> None:
    ctx, t = open_context(), Counts()
    relay = mitm_compat.CountingRelay(ctx, t)
    assert run(relay.handle_event(events.Start())) == []  # the upstream is already open (eager connect)
    (up,) = run(relay.handle_event(events.DataReceived(ctx.client, b"hello")))
    (down,) = run(relay.handle_event(events.DataReceived(ctx.server, b"world!")))
    assert isinstance(up, commands.SendData) and (up.connection, up.data) == (ctx.server, b"hello")
    assert isinstance(down, commands.SendData) and (down.connection, down.data) == (ctx.client, b"world!")
    assert (t.bytes_up, t.bytes_down) == (5, 6)
    assert relay.flow is None  # nothing stored: no TCP flow object (ignore=True)


def test_a_watch_that_refuses_closes_both_sides_before_relaying() -> None:
    ctx, t, w = open_context(), Counts(), Watch()
    relay = mitm_compat.CountingRelay(ctx, t, w)
    run(relay.handle_event(events.Start()))
    assert [type(c) for c in run(relay.handle_event(events.DataReceived(ctx.client, b"ok")))] == [
        commands.SendData
    ]
    cmds = run(relay.handle_event(events.DataReceived(ctx.client, b"evil")))
    assert [(type(c), c.connection) for c in cmds] == [
        (commands.CloseConnection, ctx.server),
        (commands.CloseConnection, ctx.client),
    ]
    assert t.refusals == ["evil bytes"] and relay.closed
    assert run(relay.handle_event(events.DataReceived(ctx.client, b"more"))) == []  # nothing after the close
    assert (t.bytes_up, t.bytes_down) == (6, 0)


def test_a_finished_watch_is_dropped() -> None:
    ctx, t, w = open_context(), Counts(), Watch()
    relay = mitm_compat.CountingRelay(ctx, t, w)
    run(relay.handle_event(events.Start()))
    run(relay.handle_event(events.DataReceived(ctx.server, b"done")))
    assert relay.watch is None
    (sent,) = run(relay.handle_event(events.DataReceived(ctx.client, b"evil, but encrypted by now")))
    assert isinstance(sent, commands.SendData) and w.seen == [] and t.refusals == []


def test_close_both_closes_an_open_upstream_and_the_client() -> None:
    ctx = open_context()
    cmds = run(mitm_compat.CloseBoth(ctx).handle_event(events.Start()))
    assert [(type(c), c.connection) for c in cmds] == [
        (commands.CloseConnection, ctx.server),
        (commands.CloseConnection, ctx.client),
    ]
    ctx.server.state = ConnectionState.CLOSED
    (only,) = run(mitm_compat.CloseBoth(ctx).handle_event(events.Start()))
    assert (type(only), only.connection) == (commands.CloseConnection, ctx.client)


def test_the_counting_interception_stack_is_what_mitmproxy_builds() -> None:
    t = Counts()
    top = mitm_compat.counting_interception(open_context(), t)
    assert isinstance(top, ServerTLSLayer) and isinstance(top.child_layer, ClientTLSLayer)
    assert top.tunnel is t  # type: ignore[attr-defined]


def test_an_open_server_gets_its_name_back() -> None:
    server = tflow.tserver_conn()
    server.state = ConnectionState.OPEN
    with pytest.raises(RuntimeError):  # what mitmproxy forbids, and the helper bypasses
        server.address = ("public.test", 443)
    mitm_compat.set_open_server_address(server, ("public.test", 443))
    assert server.address == ("public.test", 443)


def test_raise_listen_backlog_reaches_the_listening_sockets() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)

        class Server:
            sockets = (s,)

        class Instance:
            _servers = (Server(),)

        class Proxyserver:
            servers = (Instance(),)

        assert mitm_compat.raise_listen_backlog(Proxyserver(), 64) == 1
        assert s.fileno() >= 0  # the shared socket stays open (only the dup was closed)
    assert mitm_compat.raise_listen_backlog(object(), 64) == 0


def test_the_raw_target_is_the_bytes_mitmproxy_read() -> None:
    r = tflow.treq(method=b"GET", path=b"/a%20b?q", authority=b"public.test:80")
    assert mitm_compat.raw_target(r) == (b"GET", b"/a%20b?q", b"public.test:80")


def test_the_proxyserver_keeps_its_asyncio_servers_where_the_backlog_helper_looks() -> None:
    # raise_listen_backlog walks proxyserver.servers -> instance._servers -> server.sockets.
    from mitmproxy.addons import proxyserver
    from mitmproxy.proxy import mode_servers

    assert "self._servers = await self.listen(" in inspect.getsource(mode_servers.AsyncioServerInstance)
    assert "self.servers = Servers(self)" in inspect.getsource(proxyserver.Proxyserver.__init__)
    assert "__iter__" in vars(proxyserver.Servers)  # iterating it yields the server instances


# -- 7. reading requests: mitmproxy's real HTTP layer, driven with its own events ---------------------


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
    [b"GET http://%s:1/ HTTP/1.1" % OVERFLOW, b"CONNECT %s:1 HTTP/1.1" % OVERFLOW,
     b"GET http://a.%s.test/ HTTP/1.1" % OVERFLOW],
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
    d.send(b"POST http://blocked.test/x HTTP/1.1\r\nHost: blocked.test\r\nExpect: 100-continue\r\n"
           b"Content-Length: 5\r\n\r\n")
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
