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
from mitmproxy import version
from mitmproxy.connection import ConnectionState
from mitmproxy.options import Options
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1, _http2, _http_h2
from mitmproxy.proxy.layers.tls import ClientTLSLayer, ServerTLSLayer
from mitmproxy.test import tflow

from addons.proxy import mitm_compat, mitm_speed
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
