"""Plain helpers shared by the approvals tests (`from tests.approvals.approvals_support import ...`)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable

from addons.approvals.model import Approval
from addons.pipeline.model import Outcome
from addons.policy.model import Action, Client, Layer, Reason, Request, RuleRef

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
SECRET_ENV = "PORTCULLIS_TEST_WEBHOOK_SECRET"
TOKEN = "test-admin-token-0123456789"


def request(host: str = "unknown.example", port: int = 443, client: str = "10.0.0.5", *,
            user: str | None = None, client_name: str | None = None, scheme: str | None = "https",
            method: str | None = None, path: str | None = None, rule: str | None = None,
            flow_id: str = "f1") -> Outcome:
    """The provisional outcome the pipeline hands to approvals for a request the policy judged
    `approval` (addons/pipeline/decide.py: `_outcome`, then `_settle`)."""
    layer = Layer.CONNECT if method == "CONNECT" else Layer.HTTP
    req = Request(host, port, Client(client, 40000, user, "conn1"), scheme, method, path, layer, flow_id)
    ref = RuleRef(rule, Action.APPROVAL, "rules/base.yaml", 3) if rule else None
    return Outcome(req, Action.DENY, Reason.RULE if rule else Reason.DEFAULT, status=403, rule=ref,
                   client_name=client_name)


def alive() -> bool:
    return True


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition (bounded): the tests never sleep a fixed time and hope."""
    for _ in range(int(timeout / 0.01)):
        if pred():
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
