"""mitm_compat.speed: what mitmproxy's debug type checks and hook dispatch do, checked against the
installed mitmproxy, and the planned dispatch driven beside mitmproxy's own on the same addons."""

from __future__ import annotations

import inspect

import pytest
from mitmproxy.test import tflow

from addons.proxy import mitm_compat
from addons.proxy.mitm_compat import speed as mitm_speed
from addons.proxy.responses import error_body, h2_error_headers, http1_error_response


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
    def __init__(
        self, name: str, calls: list[str], fail: type[BaseException] | None = None, is_async: bool = False
    ) -> None:
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
    addons = [
        _Recorder("a", calls),
        _Odd(),
        _Recorder("b", calls, RuntimeError, is_async=True),
        _Broken(),
        _Recorder("c", calls),
        _Updates(calls),
        _Recorder("halt", calls, exceptions.AddonHalt),
        _Recorder("never", calls),
    ]
    fid, errors = await _dispatch(addons, planned, caplog)
    assert calls == [f"a:{fid}", f"b:{fid}", f"c:{fid}", f"halt:{fid}", "update:1"]
    assert any("Addon error: boom" in e for e in errors) and any("not callable" in e for e in errors)


async def test_the_plan_follows_the_chain_and_nested_addons_keep_mitmproxys_walk(caplog):
    from mitmproxy import master, options
    from mitmproxy.proxy.layers.http import HttpRequestHeadersHook

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
