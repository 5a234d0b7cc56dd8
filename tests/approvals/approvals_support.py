"""Plain helpers shared by the approvals tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

from addons.approvals.service import ApprovalRequest

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
SECRET_ENV = "PORTCULLIS_TEST_WEBHOOK_SECRET"
TOKEN = "test-admin-token-0123456789"


def request(host: str = "unknown.example", port: int = 443, client: str = "10.0.0.5",
            **kw: Any) -> ApprovalRequest:
    base: dict[str, Any] = {"client_key": client, "client_address": client, "client_name": None, "host": host,
                            "port": port, "scheme": "https", "method": None, "path": None, "rule": None,
                            "flow_id": "f1"}
    base.update(kw)
    return ApprovalRequest(**base)


def alive() -> bool:
    return True


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition (bounded): the tests never sleep a fixed time and hope."""
    for _ in range(int(timeout / 0.01)):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")
