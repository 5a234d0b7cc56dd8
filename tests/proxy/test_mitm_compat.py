"""What addons/proxy/mitm_compat.py relies on in mitmproxy's internals. Each test names one
assumption; a mitmproxy upgrade that changes it fails here, loudly, before any bypass can."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
from mitmproxy import version
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1, _http2, _http_h2

from addons.proxy import mitm_compat, mitm_speed
from addons.proxy.responses import error_body, h2_error_headers, http1_error_response
from tests.harness import REPO


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


@pytest.mark.e2e
def test_run_refuses_to_start_on_an_unsupported_mitmproxy(tmp_path):
    # A sitecustomize makes the installed mitmproxy claim another version before the CLI starts.
    (tmp_path / "sitecustomize.py").write_text("import mitmproxy.version as v\nv.VERSION = '13.0.0'\n")
    (tmp_path / "portcullis.yaml").write_text("rules: []\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    p = subprocess.run(
        [sys.executable, "-m", "addons.cli", "run", "--config", str(tmp_path / "portcullis.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert p.returncode == 2, p.stderr
    assert "mitmproxy 13.0.0 is not supported" in p.stderr and "mitmproxy>=12.2,<12.3" in p.stderr


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
