"""The approval page at `GET /`: login (HttpOnly SameSite=Strict cookie), list, decide by POST with CSRF."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Mapping
from html import escape

from aiohttp import web

from addons.approvals.auth import NO_TOKEN, token_ok
from addons.approvals.model import Approval, Choice, DecideError, Scope, State, rfc3339
from addons.approvals.service import ApprovalService

SESSION_COOKIE = "portcullis_session"
LOGIN_COOKIE = "portcullis_login"
SESSION_S = 12 * 3600
LOGIN_FAILURES, LOGIN_WINDOW_S = 10, 60.0
_ACTIONS = ((Choice.ALLOW, Scope.ONCE, "Allow once"), (Choice.ALLOW, Scope.SESSION, "Allow for session"),
            (Choice.ALLOW, Scope.ALWAYS, "Allow always"), (Choice.DENY, Scope.ONCE, "Deny"),
            (Choice.DENY, Scope.SESSION, "Deny for session"), (Choice.DENY, Scope.ALWAYS, "Deny always"))
_BY_VALUE = {f"{d.value}:{s.value}": (d, s) for d, s, _ in _ACTIONS}  # the buttons' values: "allow:once" ...
_HINTS = {Scope.ONCE: "only the requests waiting now (or the next retry)",
          Scope.SESSION: "this client, this host:port, for approvals.session_ttl",
          Scope.ALWAYS: "adds a rule to approvals.persist_to"}
_HEADERS = {
    # No scripts at all; forms may only post back here; never framed (clickjacking).
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}
_STYLE = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
.msg{padding:8px;background:#eef}
.err{background:#fee}button{margin:2px}button[value^=deny]{color:#a00}code{font-size:13px}"""


def add_routes(app: web.Application, service: ApprovalService, token: str | None) -> None:
    p = _Page(service, token)
    app.router.add_get("/", p.index)
    app.router.add_post("/login", p.login)
    app.router.add_post("/logout", p.logout)
    app.router.add_post("/ui/approvals/{id}", p.decide)


class _Page:
    def __init__(self, service: ApprovalService, token: str | None) -> None:
        self.service = service
        self.token = token
        self._failures: deque[float] = deque()  # monotonic times of recent wrong tokens

    # Session cookie: "<expiry>.<nonce>.<mac>", MAC keyed by the admin token; CSRF token derived from it.

    def _mac(self, text: str) -> str:
        assert self.token
        return hmac.new(self.token.encode(), text.encode(), hashlib.sha256).hexdigest()

    def _session(self, request: web.Request) -> str | None:
        """The session nonce when the cookie is genuine and fresh."""
        value = request.cookies.get(SESSION_COOKIE)
        if not self.token or not value or value.count(".") != 2:
            return None
        expiry, nonce, mac = value.split(".")
        if not hmac.compare_digest(mac, self._mac(f"session.{expiry}.{nonce}")):
            return None
        return nonce if expiry.isdigit() and int(expiry) > time.time() else None

    def _csrf(self, nonce: str) -> str:
        return self._mac(f"csrf.{nonce}")

    def _same_origin(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None or origin == "null" and request.headers.get("Sec-Fetch-Site") == "same-origin":
            return True
        return origin.split("://", 1)[-1] == request.host

    # Handlers

    async def index(self, request: web.Request) -> web.Response:
        nonce = self._session(request)
        if nonce is None:
            return self._login_page(request)
        return self._list_page(nonce)

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        given = _field(form, "token")
        login_csrf = request.cookies.get(LOGIN_COOKIE, "")
        if not self._same_origin(request) or not login_csrf or \
                not hmac.compare_digest(login_csrf, _field(form, "csrf")):
            return self._login_page(request, "The login form expired; try again.", status=403)
        if not self.token:
            return self._login_page(request, NO_TOKEN, status=401)
        now = time.monotonic()
        while self._failures and now - self._failures[0] > LOGIN_WINDOW_S:
            self._failures.popleft()
        if len(self._failures) >= LOGIN_FAILURES:  # slow down guessing; the API's bearer check is unaffected
            return self._login_page(request, "Too many wrong tokens; wait a minute.", status=429)
        if not token_ok(self.token, given):
            self._failures.append(now)
            return self._login_page(request, "Wrong token.", status=401)
        expiry, nonce = int(time.time()) + SESSION_S, secrets.token_hex(16)
        resp = web.HTTPSeeOther("/", headers=_HEADERS)
        resp.set_cookie(SESSION_COOKIE, f"{expiry}.{nonce}.{self._mac(f'session.{expiry}.{nonce}')}",
                        max_age=SESSION_S, path="/", httponly=True, samesite="Strict", secure=request.secure)
        resp.del_cookie(LOGIN_COOKIE, path="/")
        raise resp

    async def logout(self, request: web.Request) -> web.Response:
        nonce = self._session(request)
        form = await request.post()
        if nonce is None or not hmac.compare_digest(self._csrf(nonce), _field(form, "csrf")):
            return _html("<p>Not logged in.</p>", status=403)
        resp = web.HTTPSeeOther("/", headers=_HEADERS)
        resp.del_cookie(SESSION_COOKIE, path="/")
        raise resp

    async def decide(self, request: web.Request) -> web.Response:
        nonce = self._session(request)
        if nonce is None:
            return self._login_page(request, "Log in first.", status=401)
        form = await request.post()
        if not self._same_origin(request) or not hmac.compare_digest(self._csrf(nonce), _field(form, "csrf")):
            return self._list_page(nonce, "Refused: missing or wrong CSRF token. Reload the page.",
                                   status=403)
        action = _BY_VALUE.get(_field(form, "action"))
        if action is None:
            return self._list_page(nonce, "Unknown action.", status=422)
        decision, scope = action
        by = _field(form, "by").strip() or "approval page"
        reason = _field(form, "reason").strip() or None
        approval_id = request.match_info["id"]
        try:
            a = await self.service.decide(approval_id, decision, scope, by[:200], reason)
        except DecideError as e:
            return self._list_page(nonce, e.message, status=e.status)
        verb = "Allowed" if decision is Choice.ALLOW else "Denied"
        return self._list_page(nonce, f"{verb} ({scope.value}): {a.host}:{a.port} [{a.id}]", ok=True)

    # Rendering

    def _login_page(self, request: web.Request, msg: str | None = None, status: int = 200) -> web.Response:
        if not self.token:
            return _html(f"<h1>Portcullis approvals</h1><p class='msg err'>{escape(NO_TOKEN)}</p>",
                         status=401)
        csrf = request.cookies.get(LOGIN_COOKIE) or secrets.token_hex(16)
        note = f"<p class='msg err'>{escape(msg)}</p>" if msg else ""
        body = (f"<h1>Portcullis approvals</h1>{note}<form method='post' action='/login'>"
                f"<input type='hidden' name='csrf' value='{csrf}'>"
                "<label>Admin token <input type='password' name='token' autocomplete='current-password' "
                "autofocus></label> <button type='submit'>Log in</button></form>")
        resp = _html(body, status=status)
        resp.set_cookie(LOGIN_COOKIE, csrf, max_age=3600, path="/", httponly=True, samesite="Strict",
                        secure=request.secure)
        return resp

    def _list_page(self, nonce: str, msg: str | None = None, status: int = 200,
                   ok: bool = False) -> web.Response:
        csrf = self._csrf(nonce)
        now = time.time()
        note = f"<p class='msg{'' if ok else ' err'}'>{escape(msg)}</p>" if msg else ""
        items = self.service.listing(recent=20)
        pending = [a for a in items if a.state is State.PENDING and a.expires_at > now]
        rows = "".join(self._row(a, csrf, now) for a in pending) or \
            "<tr><td colspan='7'>Nothing is waiting for a decision.</td></tr>"
        recent = "".join(
            f"<tr><td><code>{escape(a.id)}</code></td><td>{escape(_dest(a))}</td><td>{escape(a.state.value)}</td>"
            f"<td>{escape(a.scope.value if a.scope else '')}</td><td>{escape(a.decided_by or '')}</td>"
            f"<td>{escape(a.reason or '')}</td></tr>"
            for a in items if a.state is not State.PENDING)
        body = (
            f"<h1>Portcullis approvals</h1>{note}<p><a href='/'>Refresh</a></p>"
            f"<form method='post' action='/logout'><input type='hidden' name='csrf' value='{csrf}'>"
            "<button type='submit'>Log out</button></form><h2>Pending</h2><table id='pending'>"
            "<tr><th>Client</th><th>Destination</th><th>Rule</th><th>Age</th><th>Time left</th>"
            f"<th>Waiting</th><th>Decide</th></tr>{rows}</table><h2>Recent</h2><table id='recent'><tr>"
            "<th>Id</th><th>Destination</th><th>State</th><th>Scope</th><th>By</th><th>Reason</th></tr>"
            f"{recent}</table>")
        return _html(body, status=status)

    def _row(self, a: Approval, csrf: str, now: float) -> str:
        client = escape(a.client_name or "") + (f" <code>{escape(a.client_address)}</code>"
                                                if a.client_address else "")
        buttons = "".join(f"<button type='submit' name='action' value='{d.value}:{s.value}' "
                          f"title='{_HINTS[s]}'>"
                          f"{label}</button>" for d, s, label in _ACTIONS)
        return (
            f"<tr data-id='{escape(a.id)}'><td>{client}</td><td>{escape(_dest(a))}</td>"
            f"<td>{escape(a.rule or '(default)')}</td><td>{_ago(now - a.created_at)}</td>"
            f"<td title='{rfc3339(a.expires_at)}'>{_ago(a.expires_at - now)}</td>"
            f"<td>{self.service.waiters(a)}</td>"
            f"<td><form method='post' action='/ui/approvals/{escape(a.id)}'>"
            f"<input type='hidden' name='csrf' value='{csrf}'>"
            "<input name='by' placeholder='your name' size='10'> "
            f"<input name='reason' placeholder='reason' size='16'> {buttons}</form></td></tr>")


def _field(form: Mapping[str, object], name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _dest(a: Approval) -> str:
    """`GET http://host:80/path`, or `CONNECT host:443` for a tunnel."""
    method = f"{a.method} " if a.method else ""
    scheme = f"{a.scheme}://" if a.scheme else ""
    return f"{method}{scheme}{a.host}:{a.port}{a.path or ''}"


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def _html(body: str, status: int = 200) -> web.Response:
    doc = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Portcullis approvals</title>"
           f"<style>{_STYLE}</style></head><body>{body}</body></html>")
    return web.Response(text=doc, status=status, content_type="text/html", headers=_HEADERS)
