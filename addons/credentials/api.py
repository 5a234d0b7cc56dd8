"""Admin API for task credentials: `POST /credentials` (mint), `GET /credentials`, `DELETE
/credentials/{task_id}` (revoke). Bearer token, like the approvals API; the secret is in the mint
answer only, once."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlsplit

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from addons.approvals.api import authenticate, error
from addons.approvals.auth import Principal, Principals, Role
from addons.approvals.model import rfc3339
from addons.config.models import parse_duration
from addons.credentials.service import CredentialService, MintError

log = logging.getLogger(__name__)


class MintBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    task_id: str = Field(min_length=1, max_length=64)
    profile: str | None = Field(default=None, min_length=1, max_length=64)
    ttl: str | int | float | None = None  # seconds, or 30m / 8h
    labels: dict[str, str] = Field(default_factory=dict)


def add_routes(
    app: web.Application, service: CredentialService, principals: Principals, proxy_url: str
) -> None:
    api = _Api(service, principals, proxy_url)
    app.router.add_post("/credentials", _json_errors(api.mint))
    app.router.add_get("/credentials", _json_errors(api.list))
    app.router.add_delete("/credentials/{task_id}", _json_errors(api.revoke))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_errors(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as e:  # a store failure is a JSON 503 the orchestrator can show, and is logged
            log.exception("credentials API %s %s failed", request.method, request.path)
            return error(503, "store_unavailable", f"the credentials store failed: {type(e).__name__}: {e}")

    return wrapped


def with_userinfo(proxy_url: str, user: str, secret: str) -> str:
    """http://portcullis:8080 + user + secret -> http://user:secret@portcullis:8080"""
    parts = urlsplit(proxy_url if "://" in proxy_url else "http://" + proxy_url)
    return f"{parts.scheme}://{quote(user, safe='')}:{quote(secret, safe='')}@{parts.netloc}"


class _Api:
    def __init__(self, service: CredentialService, principals: Principals, proxy_url: str) -> None:
        self.service = service
        self.principals = principals
        self.proxy_url = proxy_url

    def _admin(self, request: web.Request) -> Principal | web.Response:
        """Only admins mint, list and revoke task credentials (approvers decide approvals)."""
        who = authenticate(request, self.principals)
        if isinstance(who, Principal) and who.role is not Role.ADMIN:
            return error(403, "forbidden", f"{who.name} is an approver; task credentials need an admin")
        return who

    async def mint(self, request: web.Request) -> web.Response:
        who = self._admin(request)
        if isinstance(who, web.Response):
            return who
        try:
            body = MintBody.model_validate(json.loads(await request.read()))
            ttl = None if body.ttl is None else parse_duration(body.ttl)
        except (ValueError, UnicodeDecodeError) as e:
            return error(422, "invalid_body", _explain(e))
        try:
            m = await self.service.mint(body.task_id, body.profile, ttl, body.labels, by=who.name)
        except MintError as e:
            return error(e.status, e.code, e.message)
        c = m.credential
        doc: dict[str, Any] = {
            "task_id": c.task_id,
            "user": c.task_id,
            "password": m.secret,
            "proxy_url": with_userinfo(self.proxy_url, c.task_id, m.secret),
            "expires_at": rfc3339(c.expires_at),
            "profile": c.profile,
            "labels": dict(c.labels),
        }
        return web.json_response(doc, status=201, headers={"Cache-Control": "no-store"})

    async def list(self, request: web.Request) -> web.Response:
        if isinstance(who := self._admin(request), web.Response):
            return who
        now = self.service.clock()
        items = [_public(c.public(now)) for c in await self.service.listing()]
        return web.json_response({"credentials": items})

    async def revoke(self, request: web.Request) -> web.Response:
        if isinstance(who := self._admin(request), web.Response):
            return who
        try:
            c = await self.service.revoke(request.match_info["task_id"], by=who.name)
        except MintError as e:
            return error(e.status, e.code, e.message)
        return web.json_response(_public(c.public(self.service.clock())))


def _public(doc: dict[str, Any]) -> dict[str, Any]:
    for k in ("created_at", "expires_at", "revoked_at"):
        if isinstance(doc.get(k), float):
            doc[k] = rfc3339(doc[k])
    return doc


def _explain(e: Exception) -> str:
    if isinstance(e, ValidationError):
        parts = [f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()]
        return ("bad credential body: " + "; ".join(parts)
                + ' (expected {"task_id": "...", "profile": "...", "ttl": "8h", "labels": {"k": "v"}})')
    return f"bad credential body: {e}"
