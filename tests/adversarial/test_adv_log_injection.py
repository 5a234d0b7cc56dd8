"""Log injection: control characters, CRLF, JSON metacharacters and unicode line separators in the
fields a client controls (request path, method, SNI, credentials, approval `by`/`reason`) must not
forge an event, a field or a line.

Oracle, on the raw stdout lines of the case: one JSON object per line, ASCII only, every string a
valid Unicode string (a strict parser such as serde_json refuses lone surrogates), each event valid
against its schema, no forged key, and exactly one egress.decision carrying the value as sent.
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import httpx
import pytest

from addons.telemetry.validate import validate_event
from tests.adversarial.adv import Adv, adv_config, case, proxy_fixture
from tests.recording import client_hello

pytestmark = pytest.mark.e2e

TOKEN = "adv-log-token-0123456789abcdef"


def _config(u, folder):
    cfg = adv_config(u, folder, clients=[
        {"name": "reviewer", "proxy_auth": {"user": "reviewer", "password_env": "ADV_LOG_PW"}}])
    cfg["approvals"] = {**cfg["approvals"], "hold": False}
    return cfg


proxy = proxy_fixture(
    "loginj",
    [
        {"name": "public", "action": "allow", "hosts": ["public.test"]},
        {"name": "ask", "action": "approval", "hosts": ["approve.test"]},
    ],
    _config,
    env={"ADV_LOG_PW": "pw", "PORTCULLIS_TEST_ADMIN_TOKEN": TOKEN},
)



def strings(v: Any) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, dict):
        return [s for k, x in v.items() for s in [k, *strings(x)]]
    if isinstance(v, list):
        return [s for x in v for s in strings(x)]
    return []


def lines_oracle(adv: Adv, start_line: int) -> list[dict[str, Any]]:
    """Every line printed since `start_line` (up to and including the barrier)."""
    adv.barrier()
    with adv.p._cond:
        lines = list(adv.p.raw_lines[start_line:])
    events = []
    for ln in lines:
        text = ln.rstrip("\n")
        assert text.isascii() and "\r" not in text, f"raw control or non-ASCII byte in a line: {text[:200]!r}"
        doc = json.loads(text)  # every line is exactly one JSON document
        for s in strings(doc):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise AssertionError(f"a lone surrogate in a logged string: {s!r}") from None
        assert "forged" not in doc, doc
        validate_event(doc)
        events.append(doc)
    return [e for e in events if e["event"] == "egress.decision"][:-1]  # the last one is the barrier


def send_and_check(adv: Adv, data: bytes) -> list[dict[str, Any]]:
    start = len(adv.p.raw_lines)
    adv.send(data, timeout=3)
    decisions = lines_oracle(adv, start)
    assert len(decisions) == 1, decisions
    return decisions


FORGE = '"},"forged":true,{"event":"egress.decision","decision":"allow'
PATHS = [
    case("nul", b"/a\x00b"),
    case("escape-sequence", b"/a\x1b[2J\x1b[31mb"),
    case("del", b"/a\x7fb"),
    case("json-breakout", b"/a" + FORGE.encode()),
    case("escaped-newline-text", b"/a\\r\\n\\u2028"),
    case("percent-crlf", b"/a%0d%0a{%22forged%22:true}"),
    case("percent-line-separator", b"/a%E2%80%A8b"),
    case("very-long", b"/" + b"a" * 5000),
]


@pytest.mark.parametrize("path", PATHS)
def test_request_path(proxy, path):
    port = proxy.rec.http
    (d,) = send_and_check(proxy, b"GET http://public.test:%d%s HTTP/1.1\r\nHost: public.test:%d\r\n\r\n"
                          % (port, path, port))
    logged = d["request"]["path"]
    sent = path.decode("latin-1")
    assert logged == sent or (len(sent) > 2048 and logged.startswith(sent[:2000])), (logged[:80], sent[:80])


# (raw method, as logged): methods are logged upper-cased; a byte that is not UTF-8 (mitmproxy decodes
# it with surrogateescape) is logged as the text \xNN, never as a lone surrogate (\udc85 in JSON,
# which serde_json or Vector refuse). None of these is a token: each is refused as bad_request.
METHODS = [
    case("at-sign", b"G@T", "G@T"),
    case("escape-sequence", b"GET\x1b[2J", "GET\x1b[2J"),
    case("json-breakout", b'G"},"forged":true,{"x":"', 'G"},"FORGED":TRUE,{"X":"'),
    case("utf8-line-separator", "G\u2028T".encode(), "G\u2028T"),
    case("utf8-paragraph-separator", "G\u2029T".encode(), "G\u2029T"),
    case("latin1-nel-byte", b"G\x85T", "G\\x85T"),
    case("invalid-utf8", b"G\xff\xfeT", "G\\xff\\xfeT"),
    case("lower-case-latin1", b"g\xe9t", "G\\xe9T"),
]


@pytest.mark.parametrize(("method", "logged"), METHODS)
def test_request_method(proxy, method, logged):
    port = proxy.rec.http
    (d,) = send_and_check(proxy, b"%s http://public.test:%d/m HTTP/1.1\r\nHost: public.test:%d\r\n\r\n"
                          % (method, port, port))
    assert (d["decision"], d["reason"], d["request"]["method"]) == ("deny", "bad_request", logged)


SNIS = [
    case("crlf-json", b'evil\r\n{"event":"egress.decision","forged":true}'),
    case("line-separator", "evil\u2028.test".encode()),
    case("escape-sequence", b"evil\x1b[2J.test"),
    case("invalid-utf8", b"evil\xff.test"),
]


@pytest.mark.parametrize("sni", SNIS)
def test_tls_server_name(proxy, sni):
    start = len(proxy.p.raw_lines)
    s, rep = proxy.tunnel(f"public.test:{proxy.rec.raw}")
    assert rep.status == 200
    s.sendall(client_hello(sni))
    s.settimeout(3)
    with contextlib.suppress(OSError):
        s.recv(10)
    s.close()
    decisions = lines_oracle(proxy, start)
    assert [(d["decision"], d["reason"]) for d in decisions] == [("allow", "rule"), ("deny", "sni_mismatch")]


USERS = [
    case("crlf-json", b'x\r\n{"event":"egress.decision","forged":true}:pw'),
    case("line-separator", "x\u2028y:pw".encode()),
    case("invalid-utf8", b"x\xff\xfe:pw"),
]


@pytest.mark.parametrize("cred", USERS)
def test_proxy_credentials(proxy, cred):
    port = proxy.rec.http
    value = base64.b64encode(cred).decode()
    (d,) = send_and_check(proxy, (f"GET http://public.test:{port}/u HTTP/1.1\r\nHost: public.test:{port}\r\n"
                                  f"Proxy-Authorization: Basic {value}\r\n\r\n").encode())
    assert (d["reason"], d["client"]["user"]) == ("proxy_auth", None)


APPROVERS = [
    case("crlf-json", 'x\r\n{"event":"egress.decision","forged":true}'),
    case("separators-and-escapes", "x\u2028y\u2029z\x1b[2J\x00\x85"),
]


@pytest.mark.parametrize("by", APPROVERS)
def test_approval_by_and_reason(proxy, by):
    port = 30_000 + len(by)  # one approval per case (same client, host and port would coalesce)
    req = f"GET http://approve.test:{port}/a HTTP/1.1\r\nHost: approve.test:{port}\r\n\r\n"
    out = proxy.send(req.encode())
    approval_id = out.reply.json()["approval_id"]
    start = len(proxy.p.raw_lines)
    with httpx.Client(trust_env=False, timeout=10) as c:
        r = c.post(f"{proxy.p.admin_url}/approvals/{approval_id}", json={"decision": "deny", "by": by,
                   "reason": by}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    proxy.p.wait_event("approval.decided", approval_id=approval_id)
    lines_oracle(proxy, start)
    (ev,) = proxy.p.find("approval.decided", approval_id=approval_id)
    # `by` in the body is ignored (the authenticated approver decides); the reason is free text.
    assert ev["by"] == "admin" and ev["reason"] == by


HOST_HDR = " HTTP/1.1\r\nHost: public.test:{P}\r\n\r\n"
RAW_IN_REQUEST_LINE = [
    case("host-line-separator", "GET http://pub\u2028lic.test:{P}/" + HOST_HDR),
    case("host-json", 'GET http://a"},"forged":true,"x":"b.test:{P}/' + HOST_HDR),
    case("path-line-separator", "GET http://public.test:{P}/a\u2028b" + HOST_HDR),
    case("path-nel", "GET http://public.test:{P}/a\x85b" + HOST_HDR),
    case("connect-line-separator", "CONNECT evil\u2028.test:443 HTTP/1.1\r\nHost: x\r\n\r\n"),
]


@pytest.mark.parametrize("text", RAW_IN_REQUEST_LINE)
def test_raw_separators_in_the_request_line(proxy, text):
    """Refused by mitmproxy's parser today (400, no event); once logged, the event must stay one line."""
    data = text.replace("{P}", str(proxy.rec.http)).encode("utf-8")
    (d,) = send_and_check(proxy, data)
    assert (d["decision"], d["reason"]) == ("deny", "bad_request")
