"""addons/approvals/webhook.py: Standard Webhooks signatures and the retrying sender, against a real
loopback receiver (the sender driven by a real service where the approval's life matters)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest

from addons.approvals.errors import ApprovalError
from addons.approvals.webhook import VerifyError, parse_secret, redact_url, sign, verify
from addons.telemetry.validate import validate_event
from tests.approvals.approvals_support import SECRET, alive, request, wait_until

KEY = base64.b64decode(SECRET.removeprefix("whsec_"))
BODY = b'{"type":"approval.requested","id":"apr_1"}'


def headers_for(msg_id: str, ts: int, body: bytes, key: bytes = KEY) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": sign(key, msg_id, ts, body)}


def test_signature_is_hmac_sha256_of_id_timestamp_body():
    """Computed independently here with hmac/hashlib, as a receiver in another language would."""
    mac = hmac.new(KEY, b"msg_1.1700000000." + BODY, hashlib.sha256).digest()
    assert sign(KEY, "msg_1", 1700000000, BODY) == "v1," + base64.b64encode(mac).decode()


def test_verify_accepts_a_genuine_webhook_and_rotated_secrets():
    now = int(time.time())
    h = headers_for("msg_1", now, BODY)
    verify(SECRET, h, BODY)
    verify(["whsec_" + base64.b64encode(b"x" * 32).decode(), SECRET], h, BODY)  # old + new during rotation
    verify(SECRET, {k.upper(): v for k, v in h.items()}, BODY)  # header names are case-insensitive
    multi = dict(h, **{"webhook-signature": "v1,AAAA " + h["webhook-signature"]})
    verify(SECRET, multi, BODY)


@pytest.mark.parametrize("case", ["tampered_body", "tampered_id", "stale", "future", "wrong_secret",
                                  "missing_header", "bad_timestamp", "no_v1"])
def test_verify_rejects(case):
    now = int(time.time())
    h, body = headers_for("msg_1", now, BODY), BODY
    if case == "tampered_body":
        body = BODY.replace(b"apr_1", b"apr_2")
    elif case == "tampered_id":
        h["webhook-id"] = "msg_2"
    elif case == "stale":
        h = headers_for("msg_1", now - 301, BODY)
    elif case == "future":
        h = headers_for("msg_1", now + 301, BODY)
    elif case == "wrong_secret":
        h = headers_for("msg_1", now, BODY, key=b"y" * 32)
    elif case == "missing_header":
        del h["webhook-signature"]
    elif case == "bad_timestamp":
        h["webhook-timestamp"] = "soon"
    elif case == "no_v1":
        h["webhook-signature"] = h["webhook-signature"].replace("v1,", "v1a,")
    with pytest.raises(VerifyError):
        verify(SECRET, h, body)


@pytest.mark.parametrize("bad", ["", "abc", "whsec_", "whsec_!!notbase64!!",
                                 "whsec_" + base64.b64encode(b"k").decode(),
                                 base64.b64encode(b"z" * 32).decode()])
def test_malformed_secret_is_rejected_with_a_clear_error(bad):
    with pytest.raises(ApprovalError, match="whsec_|base64|short"):
        parse_secret(bad)


def test_redact_url_drops_credentials_and_query():
    assert redact_url("https://u:p@hooks.example.com:8443/x?token=abc#f") == "https://hooks.example.com:8443/x"


async def always_pending() -> bool:
    return True


def deliveries(svc, result):
    return svc.telemetry.metrics.registry.get_sample_value(
        "portcullis_webhook_deliveries_total", {"result": result}) or 0.0


async def test_retries_after_500_with_the_same_webhook_id_then_stops_on_200(make_service, receiver):
    receiver.replies = [500, 503]
    svc = await make_service(hold=False, timeout=30, webhooks=[receiver.url])
    await svc.resolve(request(), alive)
    await wait_until(lambda: len(receiver.deliveries()) == 3)
    await wait_until(lambda: not svc.notifier.sender._tasks)
    got = receiver.deliveries()
    assert len(got) == 3 and all(g["verified"] for g in got)
    assert len({g["headers"]["webhook-id"] for g in got}) == 1
    assert all(g["body"] == got[0]["body"] for g in got)
    assert (deliveries(svc, "retry"), deliveries(svc, "success")) == (2.0, 1.0)


async def test_410_stops_retries_and_is_reported(make_service, receiver, events):
    receiver.replies = [410, 500, 500]
    svc = await make_service(hold=False, timeout=30, webhooks=[receiver.url])
    pend = await svc.resolve(request(), alive)
    await wait_until(lambda: not svc.notifier.sender._tasks)
    assert len(receiver.deliveries()) == 1
    [failed] = events.of("webhook.failed")
    validate_event(failed)
    assert failed["approval_id"] == pend.approval_id
    assert (failed["status"], failed["result"]) == (410, "gone")
    assert deliveries(svc, "gone") == 1.0


async def test_redirects_are_not_followed_and_retries_end_at_expiry(make_service, receiver, events):
    receiver.redirect_to = "/moved"
    svc = await make_service(hold=False, timeout=0.6, webhooks=[receiver.url + "?token=s3cret"])
    pend = await svc.resolve(request(), alive)
    expires = (await svc.store.get(pend.approval_id)).expires_at
    await wait_until(lambda: not svc.notifier.sender._tasks)
    assert receiver.deliveries("/moved") == []
    attempts = receiver.deliveries()
    assert len(attempts) >= 2  # retried ...
    assert all(int(a["headers"]["webhook-timestamp"]) <= expires for a in attempts)  # ... but not past expiry
    first, failed = events.of("webhook.failed")  # the first failed attempt at once, then the last
    for ev in (first, failed):
        validate_event(ev)
        assert "s3cret" not in ev["url"] and "?" not in ev["url"]
    assert (first["attempt"], first["final"], first["result"], first["status"]) == (1, False, "retry", 307)
    assert failed["result"] == "expired" and failed["status"] == 307 and failed["final"] is True
    assert deliveries(svc, "failed") == 1.0


async def test_every_endpoint_gets_its_own_delivery(make_service, receiver):
    svc = await make_service(hold=False, webhooks=[receiver.url, receiver.url + "?second"])
    await svc.resolve(request(), alive)
    await wait_until(lambda: len(receiver.deliveries()) == 2)
    ids = {g["headers"]["webhook-id"] for g in receiver.deliveries()}
    assert len(ids) == 2 and all(g["verified"] for g in receiver.deliveries())


async def test_each_attempt_has_a_fresh_timestamp_and_signature(receiver, events):
    from addons.approvals.webhook import Endpoint, WebhookSender

    ticks = iter(range(0, 10_000, 5))
    clock = lambda: time.time() + next(ticks)  # noqa: E731 - every reading is 5 s later than the last
    sender = WebhookSender([Endpoint(receiver.url, KEY)], events.telemetry, clock=clock, backoff_base=0.01)
    await sender.start()
    receiver.replies = [500]
    sender.send("apr_x", {"id": "apr_x"}, expires_at=time.time() + 3600, still_pending=always_pending)
    await wait_until(lambda: len(receiver.deliveries()) == 2)
    await sender.stop()
    first, second = receiver.deliveries()
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == "msg_apr_x_0"
    assert int(second["headers"]["webhook-timestamp"]) > int(first["headers"]["webhook-timestamp"])
    assert first["headers"]["webhook-signature"] != second["headers"]["webhook-signature"]
    assert first["verified"] and second["verified"]


def _tls_pair(folder):
    """A throwaway CA and a server cert for 127.0.0.1 (what an internal webhook endpoint would have)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hooks test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(
              digital_signature=True, content_commitment=False, key_encipherment=False,
              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
              encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hooks")])
    leaf = (x509.CertificateBuilder().subject_name(leaf_name)
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (folder / "leaf.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    return folder / "ca.pem", folder / "leaf.pem", folder / "leaf.key"


async def test_https_endpoint_with_an_internal_ca_from_ssl_cert_file(tmp_path, events, monkeypatch):
    import ssl

    from aiohttp import web

    from addons.approvals.webhook import Endpoint, WebhookSender

    ca, cert, key = _tls_pair(tmp_path)
    got: list[bool] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        verify(SECRET, dict(request.headers), body)
        got.append(True)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        for cafile, expect in ((None, False), (str(ca), True)):
            if cafile:
                monkeypatch.setenv("SSL_CERT_FILE", cafile)
            sender = WebhookSender([Endpoint(url, KEY)], events.telemetry, backoff_base=0.01)
            await sender.start()
            sender.send("apr_t", {"id": "apr_t"}, expires_at=time.time() + 0.3, still_pending=always_pending)
            await wait_until(lambda s=sender: not s._tasks)
            await sender.stop()
            assert bool(got) is expect  # unknown CA: refused; with SSL_CERT_FILE: delivered
    finally:
        await runner.cleanup()
