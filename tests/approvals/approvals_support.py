"""Plain helpers shared by the approvals tests (`from tests.approvals.approvals_support import ...`)."""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

from addons.approvals.model import Approval
from addons.pipeline.model import Outcome
from addons.policy.model import Action, Client, Layer, Reason, Request, RuleRef
from addons.telemetry.events import Telemetry

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
SECRET_ENV = "PORTCULLIS_TEST_WEBHOOK_SECRET"
TOKEN = "test-admin-token-0123456789"


def request(host: str = "unknown.example", port: int = 443, client: str = "10.0.0.5", *,
            user: str | None = None, client_name: str | None = None, scheme: str | None = "https",
            method: str | None = None, path: str | None = None, rule: str | None = None,
            flow_id: str = "f1", task: str | None = None, task_until: float | None = None,
            labels: tuple[tuple[str, str], ...] = ()) -> Outcome:
    """The provisional outcome the pipeline hands to approvals for a request the policy judged
    `approval` (addons/pipeline/decide.py: `_outcome`, then `_settle`)."""
    layer = Layer.CONNECT if method == "CONNECT" else Layer.HTTP
    who = Client(client, 40000, user, "conn1", task, "frontend" if task else None, labels, task_until)
    req = Request(host, port, who, scheme, method, path, layer, flow_id)
    ref = RuleRef(rule, Action.APPROVAL, "rules/base.yaml", 3) if rule else None
    return Outcome(req, Action.DENY, Reason.RULE if rule else Reason.DEFAULT, status=403, rule=ref,
                   client_name=client_name)


def alive() -> bool:
    return True


async def wait_until(pred: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll a condition, plain or a coroutine function (bounded): the tests never sleep a fixed time
    and hope."""
    for _ in range(int(timeout / 0.01)):
        got = pred()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


def approval(i: str = "apr_1", **kw: object) -> Approval:
    """A stored approval row for the store tests (client c, host h, port 443, created 100, expires 200)."""
    base: dict[str, object] = {
        "id": i, "client_key": "c", "client_address": "10.0.0.1", "client_name": None, "host": "h",
        "port": 443, "scheme": "https", "method": None, "path": "/p", "rule": None, "created_at": 100.0,
        "expires_at": 200.0,
    }
    return Approval(**(base | kw))  # type: ignore[arg-type]


class Events:
    """Telemetry writing into memory; `of(kind)` parses and filters the emitted events."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.telemetry = Telemetry(stream=self.stream)

    def all(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line.strip()]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.all() if e["event"] == kind]
