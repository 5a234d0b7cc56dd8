"""The answers the proxy writes itself: 403 denials, 407 proxy-auth challenges, 502 upstream failures."""

from __future__ import annotations

import json
from collections.abc import Mapping

from mitmproxy import http

from addons.pipeline.model import Outcome
from addons.policy.model import Reason
from addons.proxy.mitm_compat import http1_bytes

DECISION_HEADER = "X-Portcullis-Decision"
REASON_HEADER = "X-Portcullis-Reason"

# One sentence per reason that a person or an agent can act on.
_MESSAGES: dict[Reason, str] = {
    Reason.RULE: "Rule '{rule}' denies {dest}; ask an operator to change the rules if this access is needed.",
    Reason.DEFAULT: "No rule allows {dest} and the default action is to deny; ask an operator to add an "
    "allow rule.",
    Reason.PRIVATE_ADDRESS: "{dest} is a private, local or metadata address ({detail}), which is never "
    "reachable through this proxy.",
    Reason.SNI_MISMATCH: "The TLS server name in the tunnel to {dest} is missing or differs from the "
    "CONNECT host; connect with the real host name.",
    Reason.HOST_MISMATCH: "The Host header or request target differs from the destination {dest}; send "
    "requests only to the host you connected to.",
    Reason.APPROVAL_DENIED: "A person denied access to {dest}.",
    Reason.APPROVAL_TIMEOUT: "Access to {dest} needs approval and none was given in time; retry later or "
    "ask an operator.",
    Reason.APPROVAL_PENDING: "Access to {dest} needs approval (id {approval_id}); retry after it is "
    "approved.",
    Reason.BAD_REQUEST: "The request could not be understood as a proxy request to {dest} ({detail}).",
    Reason.PROXY_AUTH: "Proxy credentials are missing or wrong ({detail}); send a valid Proxy-Authorization "
    "header.",
    Reason.CLIENT_CLOSED: "The client closed the connection while access to {dest} was waiting for approval.",
    Reason.EVENT_SINK_STALLED: "The proxy's event log is not being read, so no request to {dest} can be "
    "recorded; the request was refused to stay safe, retry shortly.",
    Reason.INTERNAL_ERROR: "The proxy could not decide on {dest} because of an internal error; the request "
    "was refused to stay safe.",
    Reason.CREDENTIAL_LEAK: "The request to {dest} was refused: {detail}. The proxy adds credentials itself, "
    "only to the requests they are bound to; never send a placeholder or a secret anywhere else.",
}


def message_for(
    reason: Reason, host: str, port: int | None, rule: str | None, approval_id: str | None, detail: str | None
) -> str:
    dest = f"{host}:{port}" if port else host
    tmpl = _MESSAGES.get(reason, "Access to {dest} was denied ({reason}).")
    return tmpl.format(
        dest=dest,
        rule=rule or "-",
        approval_id=approval_id or "-",
        detail=detail or reason.value,
        reason=reason.value,
    )


def _json(doc: Mapping[str, object]) -> bytes:
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def deny_response(o: Outcome) -> http.Response:
    """The answer to a refused request or CONNECT: its status (403, 400 for a malformed request, 407
    for proxy credentials), both X-Portcullis headers, a JSON body and a telling reason phrase."""
    r, rule = o.request, o.rule.name if o.rule else None
    reason = o.reason.value
    body = {
        "error": "egress_denied",
        "host": r.host,
        "port": r.port,
        "reason": reason,
        "rule": rule,
        "approval_id": o.approval_id,
        "message": message_for(o.reason, r.host, r.port, rule, o.approval_id, o.private_class or o.detail),
    }
    headers = {
        "Content-Type": "application/json",
        DECISION_HEADER: "deny",
        REASON_HEADER: reason,
        "Cache-Control": "no-store",
    }
    if o.retry_after is not None:
        headers["Retry-After"] = str(o.retry_after)
    status = o.status or 403
    if status == 407:
        headers["Proxy-Authenticate"] = 'Basic realm="portcullis"'
    resp = http.Response.make(status, _json(body), headers)
    resp.reason = f"Blocked by Portcullis: {reason} ({rule or 'none'})"
    return resp


def upstream_error_body(host: str | None, port: int | None, message: str) -> bytes:
    return _json(
        {
            "error": "upstream_failed",
            "host": host,
            "port": port,
            "reason": Reason.UPSTREAM_ERROR.value,
            "message": f"The destination was allowed but the upstream failed: {message}",
        }
    )


def upstream_error_response(host: str | None, port: int | None, message: str) -> http.Response:
    """502 after an allow: X-Portcullis-Decision stays allow so nobody mistakes it for a denial."""
    return http.Response.make(
        502,
        upstream_error_body(host, port, message),
        {
            "Content-Type": "application/json",
            DECISION_HEADER: "allow",
            REASON_HEADER: Reason.UPSTREAM_ERROR.value,
            "Cache-Control": "no-store",
        },
    )


def _error_verdict(status_code: int) -> tuple[str, str]:
    # mitmproxy answers by itself only for malformed requests (4xx) and failed upstreams (5xx).
    if status_code >= 500:
        return "allow", Reason.UPSTREAM_ERROR.value
    return "deny", Reason.BAD_REQUEST.value


def error_body(status_code: int, message: str) -> bytes:
    if status_code >= 500:
        return upstream_error_body(None, None, message or "no response")
    return _json(
        {
            "error": "egress_denied",
            "host": None,
            "port": None,
            "reason": Reason.BAD_REQUEST.value,
            "rule": None,
            "approval_id": None,
            "message": f"The request could not be understood as a proxy request ({message}).",
        }
    )


def http1_error_response(status_code: int, message: str = "") -> bytes:
    """Replacement for mitmproxy's HTML error page on HTTP/1 connections (JSON, our headers)."""
    decision, reason = _error_verdict(status_code)
    resp = http.Response.make(
        status_code,
        error_body(status_code, message),
        {
            "Content-Type": "application/json",
            DECISION_HEADER: decision,
            REASON_HEADER: reason,
            "Cache-Control": "no-store",
            "Connection": "close",
        },
    )
    if decision == "deny":
        resp.reason = f"Blocked by Portcullis: {reason} (none)"
    return http1_bytes(resp)


def h2_error_headers(status_code: int) -> list[tuple[bytes, bytes]]:
    """The headers (besides `:status`) of an HTTP/2 error answer mitmproxy sends by itself."""
    decision, reason = _error_verdict(status_code)
    return [
        (b"content-type", b"application/json"),
        (DECISION_HEADER.lower().encode(), decision.encode()),
        (REASON_HEADER.lower().encode(), reason.encode()),
    ]
