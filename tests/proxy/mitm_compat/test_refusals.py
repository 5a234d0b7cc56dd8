"""mitm_compat.refusals relies on mitmproxy's HTTP/1 and HTTP/2 connection layers building their error
pages through module-level builders, in the steps the tracking wraps. Each test names one assumption;
a mitmproxy upgrade that changes it fails here, loudly, before a refusal goes unlogged."""

from __future__ import annotations

import inspect

from mitmproxy import http
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1, _http2, _http_h2

from addons.proxy import mitm_compat
from addons.proxy.responses import error_body, h2_error_headers, http1_error_response


def test_http1_error_pages_come_from_the_module_level_builder():
    # The swap replaces _http1.make_error_response; every call site must look it up by that name.
    assert inspect.signature(_http1.make_error_response).parameters.keys() == {"status_code", "message"}
    read = inspect.getsource(inspect.unwrap(_http1.Http1Server.read_headers))
    assert "make_error_response(400, str(e))" in read
    send = inspect.getsource(inspect.unwrap(_http1.Http1Server.send))
    assert "make_error_response(status, event.message)" in send
    # ... and only in the protocol-error branch of send, the one the tracked send is used for.
    assert send.index("isinstance(event, ResponseProtocolError)") < send.index("make_error_response(")
    assert send.count("make_error_response(") == 1


def test_http2_error_pages_come_from_format_error_with_three_fixed_headers():
    src = inspect.getsource(_http2.Http2Connection._handle_event)
    assert "format_error(status, event.message)" in src
    assert '(b"server", version.MITMPROXY.encode())' in src and '(b"content-type", b"text/html")' in src
    assert list(inspect.signature(_http_h2.BufferedH2Connection.send_headers).parameters)[:3] == [
        "self",
        "stream_id",
        "headers",
    ]


def test_the_wrapped_connection_handlers_are_generators_on_the_server_side():
    assert inspect.isgeneratorfunction(_http1.Http1Connection._handle_event)
    assert inspect.isgeneratorfunction(inspect.unwrap(_http1.Http1Server.read_headers))
    assert inspect.isgeneratorfunction(inspect.unwrap(_http1.Http1Server.send))
    assert inspect.isgeneratorfunction(inspect.unwrap(_http2.Http2Server._handle_event))
    # HTTP/1 events reach send (HttpEvent) and read_headers (the state) only through these names.
    handle = inspect.getsource(_http1.Http1Connection._handle_event)
    assert "yield from self.send(event)" in handle and "yield from self.state(event)" in handle
    assert "self.state = self.read_headers" in inspect.getsource(_http1.Http1Connection.mark_done)
    # The HTTP/1 server keeps what it parsed on `self.request` (the refusal names its host).
    assert "self.request = http1.read_request_head(" in inspect.getsource(_http1.Http1Server.read_headers)
    assert _http2.Http2Server.__init__.__code__.co_varnames[:2] == ("self", "context")


def test_http2_connection_errors_go_through_protocol_error():
    pe = _http2.Http2Connection.protocol_error
    assert inspect.isgeneratorfunction(pe)
    assert list(inspect.signature(pe).parameters)[:2] == ["self", "message"]
    assert "self.protocol_error(" in inspect.getsource(_http2.Http2Server.handle_h2_event)
    assert "self.protocol_error(" in inspect.getsource(_http2.Http2Connection.handle_h2_event)


def test_invalid_requests_fire_requestheaders_with_flow_error_set_first():
    # The addon skips deciding when flow.error is set: mitmproxy answers (and the reporter logs) it.
    src = inspect.getsource(http_layers.HttpStream.check_invalid)
    assert src.index("self.flow.error = flow.Error(err)") < src.index("HttpRequestHeadersHook(self.flow)")
    assert "validate_request(" in src


def test_installed_builders_answer_json_and_report_only_with_a_running_connection():
    seen: list[object] = []
    for _ in range(2):  # idempotent: wrapping twice would report twice
        mitm_compat.install(http1_error_response, error_body, h2_error_headers, seen.append)
    page = _http1.make_error_response(400, "bad")
    assert page.startswith(b"HTTP/1.1 400 ") and b'"reason":"bad_request"' in page
    assert seen == []  # no connection layer is running here: nothing to attribute it to
    assert _http2.format_error(502, "x").startswith(b"{")  # type: ignore[attr-defined]
    # Only the steps that build pages are tracked: a tunnel's relayed bytes pass untouched.
    assert "_handle_event" not in vars(_http1.Http1Server)
    assert inspect.unwrap(_http1.Http1Server.read_headers) is not _http1.Http1Server.read_headers


def test_the_tracked_send_branches_on_the_class_mitmproxy_sends() -> None:
    from mitmproxy.proxy.layers.http import _events

    assert _http1.ResponseProtocolError is _events.ResponseProtocolError
    assert http_layers.ResponseProtocolError is _events.ResponseProtocolError  # what the layers yield


def test_http1_bytes_is_mitmproxys_response_assembly() -> None:
    from mitmproxy.net.http import http1

    resp = http.Response.make(403, b"denied\n", {"Content-Type": "text/plain"})
    out = mitm_compat.http1_bytes(resp)
    assert out == http1.assemble_response(resp)
    assert out.startswith(b"HTTP/1.1 403 Forbidden\r\n") and out.endswith(b"\r\n\r\ndenied\n")
    assert b"content-type: text/plain\r\n" in out.lower() and b"content-length: 7\r\n" in out.lower()
