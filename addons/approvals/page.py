"""The approval page at `GET /`: login with a token (HttpOnly SameSite=Strict cookie naming the
approver it belongs to), list, decide by POST with CSRF; and the one-approval pages of decision links."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Mapping
from html import escape

from aiohttp import web

from addons.approvals.auth import NO_TOKEN, Principal, Principals
from addons.approvals.errors import StoreUnavailable
from addons.approvals.links import Links
from addons.approvals.model import Approval, Choice, DecideError, Scope, State, rfc3339
from addons.approvals.service import ApprovalService

SESSION_COOKIE = "portcullis_session"
LOGIN_COOKIE = "portcullis_login"
SESSION_S = 12 * 3600
LOGIN_FAILURES, LOGIN_WINDOW_S = 10, 60.0
_ACTIONS = ((Choice.ALLOW, Scope.ONCE, "Allow once"), (Choice.ALLOW, Scope.SESSION, "Allow for session"),
            (Choice.ALLOW, Scope.TASK, "Allow for this task"), (Choice.ALLOW, Scope.ALWAYS, "Allow always"),
            (Choice.DENY, Scope.ONCE, "Deny"), (Choice.DENY, Scope.SESSION, "Deny for session"),
            (Choice.DENY, Scope.TASK, "Deny for this task"), (Choice.DENY, Scope.ALWAYS, "Deny always"))
_BY_VALUE = {f"{d.value}:{s.value}": (d, s) for d, s, _ in _ACTIONS}  # the buttons' values: "allow:once" ...
_HINTS = {Scope.ONCE: "only the requests waiting now (or the next retry)",
          Scope.SESSION: "this client, this host:port, for approvals.session_ttl",
          Scope.TASK: "this task, this host:port, until its credential expires or is revoked",
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


def add_routes(app: web.Application, service: ApprovalService, principals: Principals,
               links: Links | None = None) -> None:
    p = _Page(service, principals, links)
    app.router.add_get("/", p.index)
    app.router.add_post("/login", p.login)
    app.router.add_post("/logout", p.logout)
    app.router.add_post("/ui/approvals/{id}", p.decide)
    app.router.add_get("/approvals/{id}/link", p.link_page)
    app.router.add_post("/approvals/{id}/link", p.link_decide)


class _Page:
    def __init__(self, service: ApprovalService, principals: Principals, links: Links | None) -> None:
        self.service = service
        self.principals = principals
        self.links = links
        self._failures: deque[float] = deque()  # monotonic times of recent wrong tokens

    # Session cookie: "<expiry>.<nonce>.<approver>.<mac>", MAC keyed by every configured token (so
    # every replica with the same tokens accepts it); the CSRF token is derived from the nonce.

    def _mac(self, text: str) -> str:
        return hmac.new(self.principals.key, text.encode(), hashlib.sha256).hexdigest()

    def _session(self, request: web.Request) -> tuple[str, Principal] | None:
        """(nonce, approver) when the cookie is genuine and fresh."""
        value = request.cookies.get(SESSION_COOKIE)
        if not self.principals.configured or not value or value.count(".") != 3:
            return None
        expiry, nonce, name, mac = value.split(".")
        if not hmac.compare_digest(mac, self._mac(f"session.{expiry}.{nonce}.{name}")):
            return None
        who = self.principals.named(name)
        if who is None or not expiry.isdigit() or int(expiry) <= time.time():
            return None
        return nonce, who

    def _csrf(self, nonce: str) -> str:
        return self._mac(f"csrf.{nonce}")

    def _same_origin(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None or origin == "null" and request.headers.get("Sec-Fetch-Site") == "same-origin":
            return True
        return origin.split("://", 1)[-1] == request.host

    # Handlers

    async def index(self, request: web.Request) -> web.Response:
        session = self._session(request)
        if session is None:
            return self._login_page(request)
        return await self._list_page(*session)

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        given = _field(form, "token")
        login_csrf = request.cookies.get(LOGIN_COOKIE, "")
        if not self._same_origin(request) or not login_csrf or \
                not hmac.compare_digest(login_csrf, _field(form, "csrf")):
            return self._login_page(request, "The login form expired; try again.", status=403)
        if not self.principals.configured:
            return self._login_page(request, NO_TOKEN, status=401)
        now = time.monotonic()
        while self._failures and now - self._failures[0] > LOGIN_WINDOW_S:
            self._failures.popleft()
        if len(self._failures) >= LOGIN_FAILURES:  # slow down guessing; the API's bearer check is unaffected
            return self._login_page(request, "Too many wrong tokens; wait a minute.", status=429)
        who = self.principals.who(given)
        if who is None:
            self._failures.append(now)
            return self._login_page(request, "Wrong token.", status=401)
        expiry, nonce = int(time.time()) + SESSION_S, secrets.token_hex(16)
        resp = web.HTTPSeeOther("/", headers=_HEADERS)
        mac = self._mac(f"session.{expiry}.{nonce}.{who.name}")
        resp.set_cookie(SESSION_COOKIE, f"{expiry}.{nonce}.{who.name}.{mac}",
                        max_age=SESSION_S, path="/", httponly=True, samesite="Strict", secure=request.secure)
        resp.del_cookie(LOGIN_COOKIE, path="/")
        raise resp

    async def logout(self, request: web.Request) -> web.Response:
        session = self._session(request)
        form = await request.post()
        if session is None or not hmac.compare_digest(self._csrf(session[0]), _field(form, "csrf")):
            return _html("<p>Not logged in.</p>", status=403)
        resp = web.HTTPSeeOther("/", headers=_HEADERS)
        resp.del_cookie(SESSION_COOKIE, path="/")
        raise resp

    async def decide(self, request: web.Request) -> web.Response:
        session = self._session(request)
        if session is None:
            return self._login_page(request, "Log in first.", status=401)
        nonce, who = session
        form = await request.post()
        if not self._same_origin(request) or not hmac.compare_digest(self._csrf(nonce), _field(form, "csrf")):
            return await self._list_page(nonce, who, "Refused: missing or wrong CSRF token. Reload the page.",
                                         status=403)
        action = _BY_VALUE.get(_field(form, "action"))
        if action is None:
            return await self._list_page(nonce, who, "Unknown action.", status=422)
        decision, scope = action
        reason = _field(form, "reason").strip() or None
        approval_id = request.match_info["id"]
        try:
            a = await self.service.decide(approval_id, decision, scope, who.name, reason)
        except DecideError as e:
            return await self._list_page(nonce, who, e.message, status=e.status)
        except StoreUnavailable as e:
            return _unavailable(e)
        verb = "Allowed" if decision is Choice.ALLOW else "Denied"
        return await self._list_page(nonce, who, f"{verb} ({scope.value}): {a.host}:{a.port} [{a.id}]",
                                     ok=True)

    # Decision links: one approval, no login; the capability in the link is the authority.

    async def link_page(self, request: web.Request) -> web.Response:
        try:
            a, problem = await self._linked(request, request.query.get("cap", ""))
        except StoreUnavailable as e:
            return _unavailable(e)
        if a is None or problem is not None:
            return _html(f"<h1>Portcullis approval</h1><p class='msg err'>{escape(problem or '')}</p>",
                         status=403 if a is not None else 404)
        cap = escape(request.query.get("cap", ""))
        body = (f"<h1>Portcullis approval</h1><p>{escape(_who(a))} asks for <code>{escape(_dest(a))}</code>"
                f" (rule {escape(a.rule or '(default)')}), state <b>{escape(a.state.value)}</b>.</p>"
                f"<form method='post' action='/approvals/{escape(a.id)}/link'>"
                f"<input type='hidden' name='cap' value='{cap}'>"
                "<input name='reason' placeholder='reason' size='24'> "
                "<button type='submit' name='action' value='allow'>Allow once</button>"
                "<button type='submit' name='action' value='deny'>Deny</button></form>")
        return _html(body)

    async def link_decide(self, request: web.Request) -> web.Response:
        form = await request.post()
        try:
            a, problem = await self._linked(request, _field(form, "cap"))
        except StoreUnavailable as e:
            return _unavailable(e)
        if a is None or problem is not None:
            return _html(f"<p class='msg err'>{escape(problem or '')}</p>", status=403 if a else 404)
        if not self._same_origin(request):
            return _html("<p class='msg err'>Refused: this form must be sent from its own page.</p>", 403)
        choice = {"allow": Choice.ALLOW, "deny": Choice.DENY}.get(_field(form, "action"))
        if choice is None:
            return _html("<p class='msg err'>Unknown action.</p>", status=422)
        try:
            done = await self.service.decide(a.id, choice, Scope.ONCE, "decision link",
                                             _field(form, "reason").strip() or None)
        except DecideError as e:
            return _html(f"<p class='msg err'>{escape(e.message)}</p>", status=e.status)
        except StoreUnavailable as e:
            return _unavailable(e)
        return _html(f"<p class='msg'>{escape(done.state.value.capitalize())}: {escape(_dest(done))}</p>")

    async def _linked(self, request: web.Request, cap: str) -> tuple[Approval | None, str | None]:
        if self.links is None:
            return None, "decision links are not enabled (approvals.links)"
        a = await self.service.get(request.match_info["id"])
        if a is None:
            return None, "no such approval"
        return a, self.links.problem(a.id, cap)

    # Rendering

    def _login_page(self, request: web.Request, msg: str | None = None, status: int = 200) -> web.Response:
        if not self.principals.configured:
            return _html(f"<h1>Portcullis approvals</h1><p class='msg err'>{escape(NO_TOKEN)}</p>",
                         status=401)
        csrf = request.cookies.get(LOGIN_COOKIE) or secrets.token_hex(16)
        note = f"<p class='msg err'>{escape(msg)}</p>" if msg else ""
        body = (f"<h1>Portcullis approvals</h1>{note}<form method='post' action='/login'>"
                f"<input type='hidden' name='csrf' value='{csrf}'>"
                "<label>Your token <input type='password' name='token' autocomplete='current-password' "
                "autofocus></label> <button type='submit'>Log in</button></form>")
        resp = _html(body, status=status)
        resp.set_cookie(LOGIN_COOKIE, csrf, max_age=3600, path="/", httponly=True, samesite="Strict",
                        secure=request.secure)
        return resp

    async def _list_page(self, nonce: str, who: Principal, msg: str | None = None, status: int = 200,
                         ok: bool = False) -> web.Response:
        csrf = self._csrf(nonce)
        now = time.time()
        note = f"<p class='msg{'' if ok else ' err'}'>{escape(msg)}</p>" if msg else ""
        try:
            items = await self.service.listing(recent=20)
        except StoreUnavailable as e:
            return _unavailable(e)
        pending = [a for a in items if a.state is State.PENDING and a.expires_at > now]
        rows = "".join(self._row(a, csrf, now) for a in pending) or \
            "<tr><td colspan='7'>Nothing is waiting for a decision.</td></tr>"
        recent = "".join(
            f"<tr><td><code>{escape(a.id)}</code></td><td>{escape(_dest(a))}</td><td>{escape(a.state.value)}</td>"
            f"<td>{escape(a.scope.value if a.scope else '')}</td><td>{escape(a.decided_by or '')}</td>"
            f"<td>{escape(a.reason or '')}</td></tr>"
            for a in items if a.state is not State.PENDING)
        body = (
            f"<h1>Portcullis approvals</h1>{note}<p>Logged in as <b id='approver'>{escape(who.name)}</b> "
            f"({escape(who.role.value)}). <a href='/'>Refresh</a></p>"
            f"<form method='post' action='/logout'><input type='hidden' name='csrf' value='{csrf}'>"
            "<button type='submit'>Log out</button></form><h2>Pending</h2><table id='pending'>"
            "<tr><th>Client</th><th>Destination</th><th>Rule</th><th>Age</th><th>Time left</th>"
            f"<th>Waiting</th><th>Decide</th></tr>{rows}</table><h2>Recent</h2><table id='recent'><tr>"
            "<th>Id</th><th>Destination</th><th>State</th><th>Scope</th><th>By</th><th>Reason</th></tr>"
            f"{recent}</table>")
        return _html(body, status=status)

    def _row(self, a: Approval, csrf: str, now: float) -> str:
        client = escape(_who(a))
        buttons = "".join(f"<button type='submit' name='action' value='{d.value}:{s.value}' "
                          f"title='{_HINTS[s]}'>"
                          f"{label}</button>" for d, s, label in _ACTIONS
                          if s is not Scope.TASK or a.task_id is not None)  # task: only for a task's ask
        return (
            f"<tr data-id='{escape(a.id)}'><td>{client}</td><td>{escape(_dest(a))}</td>"
            f"<td>{escape(a.rule or '(default)')}</td><td>{_ago(now - a.created_at)}</td>"
            f"<td title='{rfc3339(a.expires_at)}'>{_ago(a.expires_at - now)}</td>"
            f"<td>{self.service.waiters(a)}</td>"
            f"<td><form method='post' action='/ui/approvals/{escape(a.id)}'>"
            f"<input type='hidden' name='csrf' value='{csrf}'>"
            f"<input name='reason' placeholder='reason' size='16'> {buttons}</form></td></tr>")


def _unavailable(e: StoreUnavailable) -> web.Response:
    return _html(f"<h1>Portcullis approvals</h1><p class='msg err'>{escape(str(e))}. Nothing can be listed "
                 "or decided until it is back; <a href='/'>try again</a>.</p>", status=503)


def _field(form: Mapping[str, object], name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _who(a: Approval) -> str:
    """The asker: its task (when it presented a task credential), group and address."""
    labels = ", ".join(f"{k}={v}" for k, v in a.labels)
    parts = [f"task {a.task_id}" if a.task_id else "", f"({labels})" if labels else "", a.client_name or "",
             a.client_address or ""]
    return " ".join(p for p in parts if p)


def _dest(a: Approval) -> str:
    """`GET http://host:80/path`, or `CONNECT host:443` for a tunnel; a credential's first use names it."""
    method = f"{a.method} " if a.method else ""
    scheme = f"{a.scheme}://" if a.scheme else ""
    cred = f" using credential {a.credential}" if a.credential else ""
    return f"{method}{scheme}{a.host}:{a.port}{a.path or ''}{cred}"


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def _html(body: str, status: int = 200) -> web.Response:
    doc = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Portcullis approvals</title>"
           f"<style>{_STYLE}</style></head><body>{body}</body></html>")
    return web.Response(text=doc, status=status, content_type="text/html", headers=_HEADERS)
