"""Adapter between the proxy and the approvals service (a safe deny when the service is absent)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from addons.policy.config import ApprovalsConfig
from addons.policy.model import Reason

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outcome:
    allowed: bool
    reason: str
    approval_id: str | None = None
    retry_after: int | None = None
    waited_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Ask:
    client_key: str
    client_address: str | None
    client_name: str | None
    host: str
    port: int
    scheme: str | None
    method: str | None
    path: str | None
    rule: str | None
    flow_id: str


class ApprovalGate:
    """Wraps `addons.approvals.service.ApprovalService` when it is importable; otherwise every
    approval is answered with approval_timeout (fail closed), which the proxy logs like any deny."""

    def __init__(self, config: ApprovalsConfig, base_dir: Path, telemetry: Any) -> None:
        self.service: Any = None
        self._request_cls: Any = None
        try:
            from addons.approvals import service as svc_mod
        except ImportError:
            log.warning("approvals service not available: approval rules deny with approval_timeout")
            return
        self.service = svc_mod.ApprovalService(config, base_dir, telemetry)
        self._request_cls = svc_mod.ApprovalRequest

    async def start(self) -> None:
        if self.service is not None:
            await self.service.start()

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()

    async def resolve(self, ask: Ask, client_alive: Callable[[], bool]) -> Outcome:
        if self.service is None:
            return Outcome(False, Reason.APPROVAL_TIMEOUT.value)
        req = self._request_cls(
            client_key=ask.client_key,
            client_address=ask.client_address,
            client_name=ask.client_name,
            host=ask.host,
            port=ask.port,
            scheme=ask.scheme,
            method=ask.method,
            path=ask.path,
            rule=ask.rule,
            flow_id=ask.flow_id,
        )
        out = await self.service.resolve(req, client_alive=client_alive)
        reason = out.reason.value if hasattr(out.reason, "value") else str(out.reason)
        return Outcome(
            bool(out.allowed), reason, out.approval_id, out.retry_after, float(out.waited_s or 0.0)
        )
