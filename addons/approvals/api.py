"""Admin approvals API (aiohttp routes): list, get and decide approvals, behind a bearer token."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from addons.approvals import page
from addons.approvals.auth import NO_TOKEN, token_ok
from addons.approvals.model import Approval, Choice, DecideError, Scope, rfc3339
from addons.approvals.service import ApprovalService

log = logging.getLogger(__name__)


class DecisionBody(BaseModel):
    """`POST /approvals/{id}` body. Unknown keys and wrong types are 422."""

    model_config = ConfigDict(extra="forbid", strict=True)
    decision: Choice = Field(strict=False)  # strict=False: the JSON string "allow" is read as Choice.ALLOW
    scope: Scope = Field(default=Scope.ONCE, strict=False)
    by: str | None = Field(default=None, max_length=200)
    reason: str | None = Field(default=None, max_length=2000)


def add_routes(app: web.Application, service: ApprovalService, token: str | None) -> None:
    """Mount the approvals API and the approval page on the admin application."""
    api = _Api(service, token)
    app.router.add_get("/approvals", _json_errors(api.list))
    app.router.add_get("/approvals/{id}", _json_errors(api.get))
    app.router.add_post("/approvals/{id}", _json_errors(api.decide))
    page.add_routes(app, service, token)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_errors(handler: Handler) -> Handler:
    """A store failure (disk full, Redis down) is a JSON 500 the CLI can show, and is logged."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as e:  # the seam between HTTP and the service
            log.exception("approvals API %s %s failed", request.method, request.path)
            return error(500, "internal_error", f"the approvals service failed: {type(e).__name__}: {e}")
    return wrapped


def approval_json(a: Approval, service: ApprovalService) -> dict[str, Any]:
    return {
        "id": a.id, "state": a.state.value, "client": a.client_address, "client_name": a.client_name,
        "host": a.host, "port": a.port, "scheme": a.scheme, "method": a.method, "path": a.path,
        "rule": a.rule, "created_at": rfc3339(a.created_at), "expires_at": rfc3339(a.expires_at),
        "decision": _value(a.decision), "scope": _value(a.scope), "by": a.decided_by, "reason": a.reason,
        "decided_at": rfc3339(a.decided_at) if a.decided_at else None, "waiters": service.waiters(a),
    }


def _value(e: Choice | Scope | None) -> str | None:
    return None if e is None else e.value


def error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="portcullis"'} if status == 401 else None
    return web.json_response({"error": code, "message": message, **extra}, status=status, headers=headers)


class _Api:
    def __init__(self, service: ApprovalService, token: str | None) -> None:
        self.service = service
        self.token = token

    def _refuse(self, request: web.Request) -> web.Response | None:
        if not self.token:
            return error(401, "unauthorized", NO_TOKEN)
        auth = request.headers.get("Authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not token_ok(self.token, given.strip()):
            return error(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")
        return None

    async def list(self, request: web.Request) -> web.Response:
        if (refused := self._refuse(request)) is not None:
            return refused
        items = [approval_json(a, self.service) for a in self.service.listing()]
        return web.json_response({"approvals": items})

    async def get(self, request: web.Request) -> web.Response:
        if (refused := self._refuse(request)) is not None:
            return refused
        a = self.service.get(request.match_info["id"])
        if a is None:
            return error(404, "not_found", f"no approval {request.match_info['id']}")
        return web.json_response(approval_json(a, self.service))

    async def decide(self, request: web.Request) -> web.Response:
        if (refused := self._refuse(request)) is not None:
            return refused
        approval_id = request.match_info["id"]
        raw = await request.read()
        try:
            body = DecisionBody.model_validate(json.loads(raw))
        except (ValueError, UnicodeDecodeError) as e:
            return error(422, "invalid_body", _explain(e))
        try:
            a = await self.service.decide(approval_id, body.decision, body.scope, body.by, body.reason)
        except DecideError as e:
            extra = {"approval": approval_json(e.approval, self.service)} if e.approval else {}
            return error(e.status, e.code, e.message, **extra)
        return web.json_response(approval_json(a, self.service))


def _explain(e: Exception) -> str:
    if isinstance(e, ValidationError):
        parts = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"]) or "body"
            parts.append(f"{where}: {err['msg']}")
        return ("bad decision body: " + "; ".join(parts) +
                ' (expected {"decision": "allow"|"deny", "scope": "once"|"session"|"always", '
                '"by": "...", "reason": "..."})')
    return f"the body is not valid JSON: {e}"
