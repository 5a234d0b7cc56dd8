"""TEMPORARY (removed by the approvals split): the pipeline's Approvals protocol over the old service."""

from __future__ import annotations

from collections.abc import Callable

from addons.approvals.service import ApprovalRequest, ApprovalService
from addons.pipeline.decide import Settlement
from addons.pipeline.model import Outcome


class ApprovalsBridge:
    def __init__(self, service: ApprovalService) -> None:
        self.service = service

    async def resolve(self, pending: Outcome, client_alive: Callable[[], bool]) -> Settlement:
        r = pending.request
        ask = ApprovalRequest(
            client_key=r.client.key,
            client_address=r.client.address,
            client_name=pending.client_name,
            host=r.host,
            port=r.port,
            scheme=r.scheme,
            method=r.method,
            path=r.path,
            rule=pending.rule.name if pending.rule else None,
            flow_id=r.flow_id,
        )
        out = await self.service.resolve(ask, client_alive)
        return Settlement(out.allowed, out.reason, out.approval_id, out.retry_after, out.waited_s)
