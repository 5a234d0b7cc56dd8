"""Admin approvals API (aiohttp routes): list, get and decide approvals, behind a bearer token."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from addons.approvals import page
from addons.approvals.auth import NO_TOKEN, Principal, Principals, bearer
from addons.approvals.errors import StoreUnavailable
from addons.approvals.links import Links
from addons.approvals.model import Approval, Choice, DecideError, Scope, rfc3339
from addons.approvals.service import ApprovalService

log = logging.getLogger(__name__)


class DecisionBody(BaseModel):
    """`POST /approvals/{id}` body. Unknown keys and wrong types are 422."""

    model_config = ConfigDict(extra="forbid", strict=True)
    decision: Choice = Field(strict=False)  # strict=False: the JSON string "allow" is read as Choice.ALLOW
    scope: Scope = Field(default=Scope.ONCE, strict=False)
    by: str | None = Field(default=None, max_length=200)  # ignored: the authenticated approver decides
    reason: str | None = Field(default=None, max_length=2000)


def add_routes(app: web.Application, service: ApprovalService, principals: Principals,
               links: Links | None = None) -> None:
    """Mount the approvals API, the approval page and the decision links on the admin application."""
    api = _Api(service, principals)
    app.router.add_get("/approvals", _json_errors(api.list))
    app.router.add_get("/approvals/{id}", _json_errors(api.get))
    app.router.add_post("/approvals/{id}", _json_errors(api.decide))
    page.add_routes(app, service, principals, links)


def authenticate(request: web.Request, principals: Principals) -> Principal | web.Response:
    """The caller of an admin route, or the 401 to answer."""
    if not principals.configured:
        return error(401, "unauthorized", NO_TOKEN)
    who = principals.who(bearer(request.headers.get("Authorization", "")))
    if who is None:
        return error(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")
    return who


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


STORE_RETRY_AFTER_S = 5


def _json_errors(handler: Handler) -> Handler:
    """A store that cannot be reached (Redis down) is a JSON 503 that says so (its health logged it once);
    any other failure (disk full, a bug) is a JSON 500 the CLI can show, and is logged."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except StoreUnavailable as e:
            return error(503, "store_unavailable", f"{e}; nothing was listed or decided, try again when "
                         "it is back", headers={"Retry-After": str(STORE_RETRY_AFTER_S)})
        except Exception as e:  # the seam between HTTP and the service
            log.exception("approvals API %s %s failed", request.method, request.path)
            return error(500, "internal_error", f"the approvals service failed: {type(e).__name__}: {e}")
    return wrapped


def approval_json(a: Approval, service: ApprovalService) -> dict[str, Any]:
    return {
        "id": a.id, "state": a.state.value, "client": a.client_address, "client_name": a.client_name,
        "task_id": a.task_id, "labels": dict(a.labels),
        "task_expires_at": rfc3339(a.task_until) if a.task_until is not None else None,
        "host": a.host, "port": a.port, "scheme": a.scheme, "method": a.method, "path": a.path,
        "rule": a.rule, "credential": a.credential,
        "created_at": rfc3339(a.created_at), "expires_at": rfc3339(a.expires_at),
        "decision": _value(a.decision), "scope": _value(a.scope), "by": a.decided_by, "reason": a.reason,
        "decided_at": rfc3339(a.decided_at) if a.decided_at else None, "waiters": service.waiters(a),
    }


def _value(e: Choice | Scope | None) -> str | None:
    return None if e is None else e.value


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None,
          **extra: Any) -> web.Response:
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="portcullis"'}
    return web.json_response({"error": code, "message": message, **extra}, status=status, headers=headers)


class _Api:
    def __init__(self, service: ApprovalService, principals: Principals) -> None:
        self.service = service
        self.principals = principals

    def _refuse(self, request: web.Request) -> web.Response | None:
        who = authenticate(request, self.principals)
        return who if isinstance(who, web.Response) else None

    async def list(self, request: web.Request) -> web.Response:
        if (refused := self._refuse(request)) is not None:
            return refused
        items = [approval_json(a, self.service) for a in await self.service.listing()]
        return web.json_response({"approvals": items})

    async def get(self, request: web.Request) -> web.Response:
        if (refused := self._refuse(request)) is not None:
            return refused
        a = await self.service.get(request.match_info["id"])
        if a is None:
            return error(404, "not_found", f"no approval {request.match_info['id']}")
        return web.json_response(approval_json(a, self.service))

    async def decide(self, request: web.Request) -> web.Response:
        who = authenticate(request, self.principals)
        if isinstance(who, web.Response):
            return who
        approval_id = request.match_info["id"]
        raw = await request.read()
        try:
            body = DecisionBody.model_validate(json.loads(raw))
        except (ValueError, UnicodeDecodeError) as e:
            return error(422, "invalid_body", _explain(e))
        try:
            a = await self.service.decide(approval_id, body.decision, body.scope, who.name, body.reason)
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
