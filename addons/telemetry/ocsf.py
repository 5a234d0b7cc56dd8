"""Native events -> OCSF 1.8.0 HTTP Activity (4002) / Network Activity (4001); lifecycle stays native."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from addons.telemetry.otel import product_version

OCSF_VERSION = "1.8.0"
CATEGORY = (4, "Network Activity")
HTTP = (4002, "HTTP Activity")
NETWORK = (4001, "Network Activity")
HTTP_ACTIVITY = {
    "CONNECT": (1, "Connect"), "DELETE": (2, "Delete"), "GET": (3, "Get"), "HEAD": (4, "Head"),
    "OPTIONS": (5, "Options"), "POST": (6, "Post"), "PUT": (7, "Put"), "TRACE": (8, "Trace"),
    "PATCH": (9, "Patch"),
}
REFUSE = (5, "Refuse")
CLOSE = (2, "Close")
SEVERITY = {1: "Informational", 2: "Low", 3: "Medium", 4: "High"}
STATUS = {0: "Unknown", 1: "Success", 2: "Failure"}
ACTION = {1: "Allowed", 2: "Denied", 99: "Pending Approval"}
DISPOSITION = {1: "Allowed", 2: "Blocked", 8: "Approved", 14: "Delayed", 15: "Detected", 25: "Rejected",
               27: "Error"}
# Tunnel refusals seen before any HTTP layer exists (ClientHello SNI, non-TLS first bytes).
_NO_HTTP_REASONS = frozenset({"sni_mismatch"})
# Native fields carried into `unmapped` as they are (the OCSF object has no place for them).
_UNMAPPED = ("enforced", "reason", "rule_file", "rule_line", "matched_rules", "layer", "latency_ms",
             "approval_wait_ms", "detail", "approval_id", "flow_id", "scope", "by", "decision", "outcome",
             "wait_s", "inspected", "credential")


def to_ocsf(doc: dict[str, Any]) -> dict[str, Any]:
    """The OCSF object for one native event; events OCSF has no class for here are returned unchanged."""
    event = doc.get("event")
    if event == "egress.decision":
        return _decision(doc)
    if event == "approval.requested":
        return _http(doc, (99, 14, 2, 0), "Held for approval")
    if event == "approval.decided":
        return _approval_decided(doc)
    if event == "tunnel.closed":
        return _tunnel_closed(doc)
    return doc  # rules.*, proxy.*, worker.*, credential.*, store.*, webhook.failed: native events


def outcome_ids(decision: str | None, reason: str | None, enforced: bool = True) -> tuple[int, int, int, int]:
    """(action_id, disposition_id, severity_id, status_id) per the mapping in standards.md §1.3."""
    if reason == "internal_error":
        return 2, 27, 4, 2
    if reason == "credential_leak":  # a placeholder or secret sent where it is not bound: exfiltration
        return 2, 2, 4, 2
    if reason == "approval_denied":
        return 2, 25, 3, 2
    if reason == "approved":
        return 1, 8, 1, 1
    if reason == "approval_pending":
        return 99, 14, 2, 0
    if reason == "approval_timeout":
        return 2, 2, 2, 2
    if decision == "allow":
        return 1, 1, 1, 1
    if not enforced:
        return 1, 15, 2, 1   # audit mode: the request went through; the would-be deny is "Detected"
    return 2, 2, 3, 2


def _decision(doc: dict[str, Any]) -> dict[str, Any]:
    ids = outcome_ids(doc.get("decision"), doc.get("reason"), bool(doc.get("enforced", True)))
    if doc.get("reason") in _NO_HTTP_REASONS and doc.get("layer") == "connect":
        return _network(doc, REFUSE, ids, f"Refused tunnel: {doc.get('reason')}")
    verdict = "Audited" if ids[1] == 15 else {1: "Allowed", 2: "Blocked", 99: "Held"}[ids[0]]
    return _http(doc, ids, verdict)


def _approval_decided(doc: dict[str, Any]) -> dict[str, Any]:
    decision = str(doc.get("decision") or doc.get("outcome") or "")
    if decision in ("allow", "approved"):
        ids, word = (1, 8, 1, 1), "approved"
    elif "approval_timeout" in (doc.get("outcome"), doc.get("reason")) or decision in ("timeout", "expired"):
        ids, word = (2, 2, 2, 2), "timed out"
    else:
        ids, word = (2, 25, 3, 2), "rejected"
    out = _http(doc, ids, f"Approval {word}")
    by = doc.get("by")
    if by:
        out["actor"] = {"user": {"name": str(by)}}
        out["metadata"]["profiles"] = ["security_control", "host"]
    out["authorizations"] = [{"decision": word}]
    return out


def _tunnel_closed(doc: dict[str, Any]) -> dict[str, Any]:
    out = _base(doc, NETWORK, CLOSE, 1)
    out["status_id"], out["status"] = 1, STATUS[1]
    up, down = _int(doc.get("bytes_up")), _int(doc.get("bytes_down"))
    out["traffic"] = {"bytes_out": up, "bytes_in": down, "bytes": up + down}
    if doc.get("duration_s") is not None:
        out["duration"] = int(float(doc["duration_s"]) * 1000)
    _endpoints(doc, out)
    out["message"] = f"Tunnel closed after {up} bytes up, {down} bytes down"
    out["metadata"]["profiles"] = []
    _unmapped(doc, out)
    return out


def _http(doc: dict[str, Any], ids: tuple[int, int, int, int], verdict: str) -> dict[str, Any]:
    request = _dict(doc.get("request"))
    method = str(request.get("method") or ("CONNECT" if doc.get("layer") == "connect" else "")).upper()
    activity = HTTP_ACTIVITY.get(method, (99, method.title() or "Other"))
    out = _base(doc, HTTP, activity, ids[2])
    _outcome(doc, out, ids)
    _endpoints(doc, out)
    dest = _dict(doc.get("destination"))
    host, port = dest.get("host"), dest.get("port")
    url: dict[str, Any] = {}
    if host:
        url["hostname"] = str(host)
    if isinstance(port, int):
        url["port"] = port
    scheme, path = request.get("scheme"), request.get("path")
    if scheme:
        url["scheme"] = str(scheme)
    if path:
        url["path"] = str(path)
    authority = f"{host}:{port}" if host and port else str(host or "")
    url["url_string"] = f"{scheme}://{authority}{path or ''}" if scheme and path is not None else authority
    http_request: dict[str, Any] = {"url": url}
    if method:
        http_request["http_method"] = method
    out["http_request"] = http_request
    out["message"] = f"{verdict} {method or 'request'} {authority}".rstrip()
    _unmapped(doc, out)
    return out


def _network(doc: dict[str, Any], activity: tuple[int, str], ids: tuple[int, int, int, int],
             message: str) -> dict[str, Any]:
    out = _base(doc, NETWORK, activity, ids[2])
    _outcome(doc, out, ids)
    _endpoints(doc, out)
    out["message"] = message
    _unmapped(doc, out)
    return out


def _base(
    doc: dict[str, Any], cls: tuple[int, str], activity: tuple[int, str], severity: int,
) -> dict[str, Any]:
    correlation = doc.get("approval_id") or doc.get("flow_id")
    metadata: dict[str, Any] = {
        "version": OCSF_VERSION,
        "product": {"name": "Portcullis", "vendor_name": "Portcullis", "version": product_version()},
        "uid": str(uuid.uuid4()),
        "log_name": "portcullis.events",
        "event_code": str(doc.get("event", "")),
        "profiles": ["security_control"],
    }
    if correlation:
        metadata["correlation_uid"] = str(correlation)
    return {
        "class_uid": cls[0], "class_name": cls[1],
        "category_uid": CATEGORY[0], "category_name": CATEGORY[1],
        "activity_id": activity[0], "activity_name": activity[1],
        "type_uid": cls[0] * 100 + activity[0], "type_name": f"{cls[1]}: {activity[1]}",
        "time": _epoch_ms(doc.get("timestamp")),
        "severity_id": severity, "severity": SEVERITY[severity],
        "metadata": metadata,
    }


def _outcome(doc: dict[str, Any], out: dict[str, Any], ids: tuple[int, int, int, int]) -> None:
    action_id, disposition_id, _sev, status_id = ids
    out["action_id"], out["action"] = action_id, ACTION[action_id]
    out["disposition_id"], out["disposition"] = disposition_id, DISPOSITION[disposition_id]
    out["status_id"], out["status"] = status_id, STATUS[status_id]
    if isinstance(doc.get("status"), int):
        out["status_code"] = str(doc["status"])
    reason = doc.get("reason")
    if reason:
        detail = doc.get("detail")
        out["status_detail"] = f"{reason}: {detail}" if detail else str(reason)
    rule = doc.get("rule")
    if rule:
        uid = f"{doc.get('rule_file')}:{doc.get('rule_line')}" if doc.get("rule_file") else str(rule)
        out["firewall_rule"] = {"name": str(rule), "uid": uid}
    elif reason == "default":
        out["firewall_rule"] = {"name": "default_action", "uid": "default"}


def _endpoints(doc: dict[str, Any], out: dict[str, Any]) -> None:
    client, dest = _dict(doc.get("client")), _dict(doc.get("destination"))
    src = {k: v for k, v in (("ip", client.get("address")), ("port", client.get("port")),
                             ("name", client.get("name"))) if v is not None}
    dst = {k: v for k, v in (("hostname", dest.get("host")), ("domain", dest.get("registered_domain")),
                             ("port", dest.get("port")), ("ip", dest.get("ip"))) if v is not None}
    if src:
        out["src_endpoint"] = src
    if dst or not src:
        # OCSF needs one endpoint; an event without either still names its (unknown) destination.
        out["dst_endpoint"] = dst or {"name": "unknown"}


def _unmapped(doc: dict[str, Any], out: dict[str, Any]) -> None:
    extra: dict[str, Any] = {k: doc[k] for k in _UNMAPPED if doc.get(k) is not None}
    client = _dict(doc.get("client"))
    if client.get("user") is not None:
        extra["client_user"] = client["user"]
    extra["event"] = doc.get("event")
    out["unmapped"] = extra


def _epoch_ms(ts: Any) -> int:
    try:
        return int(datetime.fromisoformat(str(ts).replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return int(datetime.now().timestamp() * 1000)


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0
