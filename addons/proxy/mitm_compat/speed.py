"""mitmproxy internals changed for speed (tests/proxy/mitm_compat/test_speed.py checks each assumption
against the installed mitmproxy). Installed by `mitm_compat.install()`.

1. mitmproxy type-checks every field of every Request and Response it builds, in a `__post_init__`
   it defines only `if __debug__` (i.e. unless Python runs with -O): about 5% of a plain HTTP
   request's CPU. Portcullis does not run with -O (its asserts narrow types), so the check is
   dropped here, as -O would drop it; mitmproxy's own parser builds these objects.
2. mitmproxy dispatches each hook by walking every addon (a getattr for the hook's name, an async
   call and a `safecall` context per addon), and after each flow hook walks them all again for the
   `update` hook nobody here handles: about 10% of a plain HTTP request's CPU. The planned dispatch
   keeps, per hook name, the handlers of the addon chain (rebuilt whenever the chain changes), calls
   them in chain order with the same error handling (AddonHalt stops, OptionsError propagates, any
   other error is logged by mitmproxy's `safecall` and the next addon runs), and skips hooks nobody
   handles. An addon manager whose addons nest others (scripts) keeps mitmproxy's own dispatch.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any


def install() -> None:
    skip_debug_typechecks()
    planned_hook_dispatch()


def skip_debug_typechecks() -> None:
    from mitmproxy.http import MessageData

    original = vars(MessageData).get("__post_init__")
    if original is not None and original is not _no_typecheck:
        _no_typecheck.__wrapped__ = original  # type: ignore[attr-defined]
        MessageData.__post_init__ = _no_typecheck  # type: ignore[method-assign]


def _no_typecheck(self: Any) -> None:
    """MessageData.__post_init__ without mitmproxy's debug-mode type checks."""


Handler = Callable[..., Any]


def handlers(manager: Any, name: str) -> list[Handler] | None:
    """The addons' handlers for hook `name`, in chain order; None where mitmproxy's walk must stay."""
    key = (id(manager.chain), len(manager.chain))  # add() appends, remove() and clear() replace
    cached = manager.__dict__.get("_portcullis_plans")
    if cached is None or cached[0] != key:
        if any(hasattr(a, "addons") for a in manager.chain):
            return None
        cached = manager._portcullis_plans = (key, {})
    funcs: list[Handler] | None = cached[1].get(name)
    if funcs is None:
        funcs = []
        for a in manager.chain:
            func = getattr(a, name, None)
            if func and not isinstance(func, types.ModuleType):  # a module named like a hook: skipped
                funcs.append(func if callable(func) else _not_callable(name, a))
        cached[1][name] = funcs
    return funcs


def planned_hook_dispatch() -> None:
    from mitmproxy import addonmanager, exceptions, flow, hooks

    am: Any = addonmanager.AddonManager
    if getattr(am, "_portcullis_planned", False):
        return
    original_trigger, original_lifecycle = am.trigger_event, am.handle_lifecycle

    async def trigger_event(self: Any, event: hooks.Hook) -> None:
        funcs = handlers(self, event.name)
        if funcs is None:
            await original_trigger(self, event)
            return
        if not funcs:
            return
        args = event.args()
        for func in funcs:
            try:
                res = func(*args)
                if res is not None and inspect.isawaitable(res):
                    await res
            except exceptions.AddonHalt:
                return
            except Exception as e:  # noqa: BLE001 - safecall logs it (and re-raises OptionsError)
                with addonmanager.safecall():
                    raise e

    async def handle_lifecycle(self: Any, event: hooks.Hook) -> None:
        message = event.args()[0]
        await self.trigger_event(event)
        if isinstance(message, flow.Flow) and handlers(self, "update") != []:
            await self.trigger_event(hooks.UpdateHook([message]))

    trigger_event.__wrapped__ = original_trigger  # type: ignore[attr-defined]
    handle_lifecycle.__wrapped__ = original_lifecycle  # type: ignore[attr-defined]
    am.trigger_event = trigger_event
    am.handle_lifecycle = handle_lifecycle
    am._portcullis_planned = True


def _not_callable(name: str, addon: Any) -> Handler:
    from mitmproxy import exceptions

    def fail(*_args: Any) -> None:
        raise exceptions.AddonManagerError(f"Addon handler {name} ({addon}) not callable")  # type: ignore[no-untyped-call]

    return fail
