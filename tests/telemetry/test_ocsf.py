"""`format: ocsf`: every event maps to a valid OCSF 1.8.0 object (checked against the shipped subset)."""

from __future__ import annotations

import json

import pytest

from addons.telemetry.ocsf import to_ocsf
from addons.telemetry.validate import validate_event
from tests.telemetry.tel_helpers import DECISIONS, OTHER_EVENTS, lines, make, record
from tests.telemetry.tel_ocsf_check import ocsf_errors

NATIVE = {
    "rules.reloaded", "rules.reload_failed", "webhook.failed", "proxy.started", "proxy.stopped",
    "worker.exited", "store.unreachable", "store.reconnected", "event_sink.resumed",
    "credential.minted", "credential.revoked", "credential.expired",
}


def _ocsf_stream() -> list[dict[str, object]]:
    t, out = make(log={"format": "ocsf"})
    for rec in DECISIONS:
        t.decision(rec)
    for name, fields in OTHER_EVENTS:
        t.emit(name, **fields)
    return lines(out)


def test_every_event_is_valid_ocsf_or_documented_native() -> None:
    events = _ocsf_stream()
    assert len(events) == len(DECISIONS) + len(OTHER_EVENTS)
    ocsf = [e for e in events if "class_uid" in e]
    native = [e for e in events if "class_uid" not in e]
    assert {e["event"] for e in native} == NATIVE
    for e in native:
        validate_event(e)  # lifecycle events stay native and valid
    assert len(ocsf) == len(DECISIONS) + len(OTHER_EVENTS) - len(native)
    for ev in ocsf:
        assert ocsf_errors(ev) == [], json.dumps(ev)


def test_the_checker_catches_broken_objects() -> None:
    good = to_ocsf(_native(record()))
    assert ocsf_errors(good) == []
    for mutate in (
        lambda e: e.update(type_uid=400299),
        lambda e: e.update(disposition_id=42),
        lambda e: e.update(surprise=1),
        lambda e: e["metadata"].pop("product"),
        lambda e: e["http_request"]["url"].update(query_string_x="a"),
        lambda e: e.update(action="Allowed"),
        lambda e: e.pop("time"),
        lambda e: e["dst_endpoint"].update(port="443"),
    ):
        bad = json.loads(json.dumps(good))
        mutate(bad)
        assert ocsf_errors(bad), mutate


def _native(rec: object) -> dict[str, object]:
    t, out = make()
    t.decision(rec)  # type: ignore[arg-type]
    return lines(out)[0]


@pytest.mark.parametrize(
    ("kw", "cls", "activity", "action", "disposition"),
    [
        ({"decision": "allow", "reason": "rule", "method": "GET"}, 4002, 3, 1, 1),
        ({"decision": "deny", "reason": "default", "method": "POST"}, 4002, 6, 2, 2),
        (
            {"decision": "allow", "reason": "rule", "method": "CONNECT", "layer": "connect", "path": None},
            4002,
            1,
            1,
            1,
        ),
        (
            {
                "decision": "deny",
                "reason": "sni_mismatch",
                "method": "CONNECT",
                "layer": "connect",
                "path": None,
            },
            4001,
            5,
            2,
            2,
        ),
        ({"decision": "deny", "reason": "approval_denied", "approval_id": "apr-9"}, 4002, 3, 2, 25),
        ({"decision": "allow", "reason": "approved", "approval_id": "apr-9"}, 4002, 3, 1, 8),
        ({"decision": "deny", "reason": "approval_pending", "approval_id": "apr-9"}, 4002, 3, 99, 14),
        ({"decision": "deny", "reason": "approval_timeout", "approval_id": "apr-9"}, 4002, 3, 2, 2),
        ({"decision": "deny", "reason": "internal_error"}, 4002, 3, 2, 27),
        ({"decision": "deny", "reason": "default", "enforced": False}, 4002, 3, 1, 15),
        ({"decision": "allow", "reason": "rule", "method": "MKCOL"}, 4002, 99, 1, 1),
    ],
)
def test_mapping(kw: dict[str, object], cls: int, activity: int, action: int, disposition: int) -> None:
    ev = to_ocsf(_native(record(**kw)))
    assert ocsf_errors(ev) == []
    assert (ev["class_uid"], ev["activity_id"], ev["action_id"], ev["disposition_id"]) == (
        cls,
        activity,
        action,
        disposition,
    )
    assert ev["type_uid"] == cls * 100 + activity
    assert ev["metadata"]["correlation_uid"] == (kw.get("approval_id") or "flow-1")
    assert ev["metadata"]["product"]["name"] == "Portcullis" and ev["metadata"]["version"] == "1.8.0"
    assert isinstance(ev["time"], int) and ev["time"] > 1_700_000_000_000


def test_rule_and_endpoints() -> None:
    ev = to_ocsf(_native(record(path="/raw/x")))
    assert ev["firewall_rule"] == {"name": "no-paste-sites", "uid": "rules/base.yaml:12"}
    assert ev["src_endpoint"] == {"ip": "10.0.1.5", "port": 50123, "name": "ci-agents"}
    assert ev["dst_endpoint"]["hostname"] == "pastebin.com" and ev["dst_endpoint"]["ip"] == "203.0.113.7"
    assert ev["http_request"]["url"]["url_string"] == "https://pastebin.com:443/raw/x"
    assert ev["status_code"] == "403" and ev["status_detail"] == "rule"


def test_approval_events_share_the_correlation_uid() -> None:
    t, out = make(log={"format": "ocsf"})
    t.emit(
        "approval.requested",
        approval_id="apr-7",
        destination={"host": "api.github.com", "port": 443},
        request={"scheme": "https", "method": "POST", "path": "/repos"},
        flow_id="flow-7",
    )
    t.emit("approval.decided", approval_id="apr-7", decision="allow", scope="once", by="alice")
    t.decision(
        record(decision="allow", reason="approved", approval_id="apr-7", flow_id="flow-7", method="POST")
    )
    req, dec, final = lines(out)
    assert {e["metadata"]["correlation_uid"] for e in (req, dec, final)} == {"apr-7"}
    assert (req["action_id"], req["disposition_id"]) == (99, 14)
    assert (dec["disposition_id"], dec["actor"]) == (8, {"user": {"name": "alice"}})
    for ev in (req, dec, final):
        assert ocsf_errors(ev) == []


def test_tunnel_closed_is_network_activity_close_with_traffic() -> None:
    t, out = make(log={"format": "ocsf"})
    t.emit(
        "tunnel.closed",
        flow_id="flow-3",
        bytes_up=10,
        bytes_down=20,
        duration_s=2.5,
        client={"address": "10.0.0.2"},
        destination={"host": "pypi.org", "port": 443},
    )
    (ev,) = lines(out)
    assert ocsf_errors(ev) == []
    assert (ev["class_uid"], ev["activity_id"]) == (4001, 2)
    assert ev["traffic"] == {"bytes_out": 10, "bytes_in": 20, "bytes": 30} and ev["duration"] == 2500


def test_ocsf_goes_to_the_file_too(tmp_path: object) -> None:
    from pathlib import Path

    base = Path(str(tmp_path))
    t, out = make(base, log={"format": "ocsf", "file": "events.jsonl"})
    t.decision(record())
    t.close()
    (ev,) = [json.loads(x) for x in (base / "events.jsonl").read_text().splitlines()]
    assert ev == lines(out)[0] and ocsf_errors(ev) == []


def test_a_credential_leak_is_a_high_severity_block_naming_the_credential() -> None:
    tel, out = make(log={"format": "ocsf"})
    tel.decision(record(decision="deny", reason="credential_leak", host="paste.example", status=403,
                        layer="inspected", credential="github-api"))
    (ev,) = lines(out)
    assert (ev["class_uid"], ev["action_id"], ev["disposition_id"], ev["severity_id"]) == (4002, 2, 2, 4)
    assert ev["unmapped"]["credential"] == "github-api" and ev["unmapped"]["reason"] == "credential_leak"
    assert ocsf_errors(ev) == []
