"""addons/proxy/credentials.py in process (mitmproxy's test flows): the header an Outcome names is set,
replacing every value the agent sent; a declared small body is held and read whole before anything
leaves (a needle: 403, and the refusal to record); any other body streams through the scanner and a
needle refuses the answer; TLS counts as verified only in an inspected https tunnel without
ssl_insecure."""

from __future__ import annotations

from dataclasses import replace

import pytest
from mitmproxy.addons import tlsconfig
from mitmproxy.test import taddons, tflow

from addons.pipeline.bodyscan import SCAN_LIMIT, StreamScan
from addons.pipeline.model import Outcome
from addons.policy.credentials import Injection, Secret
from addons.policy.model import Action, Layer, Reason, Request
from addons.proxy.credentials import BodyWatch, declared_length, inject, upstream_verified
from tests.policy.test_credentials import PLACEHOLDER, VALUE, cred

GH = cred()
ALLOWED = Outcome(
    Request("www.public.test", 443, layer=Layer.INSPECTED, method="POST", path="/x", flow_id="f1"),
    Action.ALLOW,
    Reason.RULE,
)


def flow(body: bytes | None = None, **headers: str) -> tflow.HTTPFlow:
    f = tflow.tflow()
    f.request.method = "POST"
    f.request.headers.clear()
    for k, v in headers.items():
        f.request.headers.add(k.replace("_", "-"), v)
    if body is not None:
        f.request.raw_content = body  # sets no header: the test says what the agent declared
    return f


def test_the_named_header_replaces_every_value_the_agent_sent() -> None:
    f = flow(Authorization="Bearer mine", X_Other="1")
    f.request.headers.add("authorization", "Bearer second")
    inject(f, replace(ALLOWED, credential="gh", injection=Injection("gh", "Authorization", Secret(VALUE))))
    assert f.request.headers.get_all("authorization") == [VALUE]
    assert f.request.headers["X-Other"] == "1"
    untouched = flow(Authorization="Bearer mine")
    inject(untouched, ALLOWED)
    assert untouched.request.headers["Authorization"] == "Bearer mine"


@pytest.mark.parametrize(
    ("headers", "http2", "size"),
    [
        ({}, False, 0),
        ({"Content_Length": "12"}, False, 12),
        ({"Content_Length": "0"}, False, 0),
        ({"Transfer_Encoding": "chunked"}, False, None),
        ({"Content_Length": "x"}, False, None),
        ({}, True, None),  # HTTP/2 without a length: a body may follow
    ],
)
def test_declared_length(headers: dict[str, str], http2: bool, size: int | None) -> None:
    f = flow(**headers)
    if http2:
        f.request.http_version = "HTTP/2.0"
    assert declared_length(f.request) == size


def test_a_small_declared_body_is_held_and_a_needle_answered_403() -> None:
    watch = BodyWatch()
    f = flow(Content_Length="40")
    f.request.stream = True
    watch.start(f, ALLOWED, (GH,))
    assert f.request.stream is False and len(watch) == 1  # held: nothing goes before it is read
    f.request.raw_content = b"token=" + PLACEHOLDER.encode()
    refusal = watch.finished(f)
    assert refusal is not None and (refusal.reason, refusal.credential, refusal.status) == (
        Reason.CREDENTIAL_LEAK,
        "gh",
        403,
    )
    assert refusal.request.flow_id == "f1" and "nothing was sent" in (refusal.detail or "")
    assert f.response is not None and f.response.status_code == 403
    assert f.response.headers["X-Portcullis-Reason"] == "credential_leak"
    assert len(watch) == 0


def test_an_innocent_held_body_goes_on_and_nothing_is_watched_without_a_body_or_needles() -> None:
    watch = BodyWatch()
    f = flow(Content_Length="5")
    watch.start(f, ALLOWED, (GH,))
    f.request.raw_content = b"hello"
    assert watch.finished(f) is None and f.response is None
    empty = flow()
    empty.request.stream = True
    watch.start(empty, ALLOWED, (GH,))
    watch.start(flow(Content_Length="9"), ALLOWED, ())
    assert empty.request.stream is True and len(watch) == 0


@pytest.mark.parametrize(
    "headers", [{"Transfer_Encoding": "chunked"}, {"Content_Length": str(SCAN_LIMIT + 1)}]
)
def test_any_other_body_streams_through_the_scanner_and_a_needle_refuses_the_answer(
    headers: dict[str, str],
) -> None:
    watch = BodyWatch()
    f = flow(**headers)
    watch.start(f, ALLOWED, (GH,))
    scan = f.request.stream
    assert isinstance(scan, StreamScan)
    sent = scan(b"a" * 100 + VALUE.encode()[:5]) + scan(VALUE.encode()[5:] + b"z") + scan(b"")
    assert VALUE.encode() not in b"".join(sent)
    refusal = watch.finished(f)
    assert (
        refusal is not None
        and refusal.reason is Reason.CREDENTIAL_LEAK
        and "streamed" in (refusal.detail or "")
    )
    assert watch.refuse_answer(f) and not watch.refuse_answer(f)  # once
    watch.forget(f)
    assert len(watch) == 0


def test_tls_counts_as_verified_only_when_inspected_https_and_not_insecure() -> None:
    with taddons.context(tlsconfig.TlsConfig()) as tctx:
        f = tflow.tflow()
        f.request.scheme = "https"
        assert upstream_verified(f, inspected=True)
        assert not upstream_verified(f, inspected=False)
        f.request.scheme = "http"
        assert not upstream_verified(f, inspected=True)
        f.request.scheme = "https"
        tctx.options.ssl_insecure = True
        assert not upstream_verified(f, inspected=True)
