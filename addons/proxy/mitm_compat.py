"""Every use of mitmproxy's private APIs, in this one module (tests/proxy/test_mitm_compat.py checks
each assumption against the installed mitmproxy and fails loudly when an upgrade changes one).

1. The error pages mitmproxy writes itself (unparsable requests, failed upstream connects): no hook
   can replace those bytes, so the page builders are swapped for Portcullis's JSON answers.
2. Those same refusals are decisions: the HTTP/1 and HTTP/2 server-side connection layers are wrapped
   so that the builders know which client they answer, and the proxy logs one `bad_request` decision
   for every request mitmproxy refuses before any hook sees it (HTTP/2 GOAWAYs included).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from mitmproxy import connection, http

log = logging.getLogger(__name__)

SUPPORTED = ((12, 2), (12, 3))  # [from, to): the versions whose internals this module was checked against


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request mitmproxy refused by itself."""

    client: connection.Client
    status: int | None  # the status it answered with; None for an HTTP/2 connection error (GOAWAY)
    message: str
    request: http.Request | None  # what it had parsed of the request, if anything


Reporter = Callable[[Refusal], None]
ErrorBuilder = Callable[[int, str], bytes]

_reporter: Reporter | None = None
_running: list[Any] = []  # the client-side connection layers whose step is running (innermost last)
_reported: weakref.WeakSet[http.Request] = weakref.WeakSet()


def check_version() -> str | None:
    """None when the installed mitmproxy is one this module supports, else what to do."""
    from mitmproxy import version

    parts = tuple(int(p) for p in version.VERSION.split(".")[:2])
    if SUPPORTED[0] <= parts < SUPPORTED[1]:
        return None
    return (
        f"mitmproxy {version.VERSION} is not supported (Portcullis relies on internals checked for "
        f"{SUPPORTED[0][0]}.{SUPPORTED[0][1]}.x); install 'mitmproxy>=12.2,<12.3' (pip install -e .)"
    )


def already_refused(request: http.Request) -> bool:
    """True when mitmproxy answered this request with an error page of its own (already logged)."""
    return request in _reported


def _report(status: int | None, message: str) -> None:
    if _reporter is None or not _running:
        return
    conn_layer = _running[-1]
    request = getattr(conn_layer, "request", None)
    if isinstance(request, http.Request):
        if request in _reported:
            return
        _reported.add(request)
    try:
        _reporter(Refusal(conn_layer.context.client, status, message, request))
    except Exception:  # noqa: BLE001 - reporting must never break mitmproxy's own error handling
        log.exception("could not record a refusal")


def _tracked(step: Callable[..., Generator[Any, Any, Any]]) -> Callable[..., Generator[Any, Any, Any]]:
    """A layer's event handler that marks itself as running while each of its steps runs."""

    def handler(self: Any, event: Any) -> Generator[Any, Any, Any]:
        gen = step(self, event)
        sent: Any = None
        while True:
            _running.append(self)
            try:
                cmd = gen.send(sent)
            except StopIteration as stop:
                return stop.value
            finally:
                _running.pop()
            sent = yield cmd

    return handler


def install(
    http1_page: ErrorBuilder,
    body: ErrorBuilder,
    h2_headers: Callable[[int], list[tuple[bytes, bytes]]],
    reporter: Reporter,
) -> None:
    """Swap mitmproxy's error pages for ours and report every refusal (4xx page or GOAWAY) it makes.

    `http1_page(status, message)` is a whole HTTP/1 response; `body(status, message)` an HTTP/2 body;
    `h2_headers(status)` the headers for that body (besides `:status`).
    """
    global _reporter
    from mitmproxy import version
    from mitmproxy.proxy.layers.http import _http1, _http2, _http_h2

    _reporter = reporter
    if getattr(_http1, "_portcullis_installed", False):
        return

    def http1_error(status_code: int, message: str = "") -> bytes:
        status = status_code
        if status < 500:
            _report(status, message)
        return http1_page(status, message)

    def h2_body(status_code: int, message: str) -> bytes:
        status = status_code
        if status < 500:
            _report(status, message)
        return body(status, message)

    _http1.make_error_response = http1_error
    _http2.format_error = h2_body  # type: ignore[attr-defined]
    _http1.Http1Server._handle_event = _tracked(_http1.Http1Connection._handle_event)  # type: ignore[method-assign]
    _http2.Http2Server._handle_event = _tracked(_http2.Http2Server._handle_event)  # type: ignore[method-assign]

    original_protocol_error = _http2.Http2Connection.protocol_error

    def protocol_error(self: Any, message: str, *args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        _running.append(self)
        try:
            _report(None, message)
        finally:
            _running.pop()
        return (yield from original_protocol_error(self, message, *args, **kwargs))

    _http2.Http2Server.protocol_error = protocol_error  # type: ignore[method-assign]

    # HTTP/2 error pages are sent with a fixed three-header list (status, server, content-type).
    page_headers = [(b"server", version.MITMPROXY.encode()), (b"content-type", b"text/html")]
    original_send_headers = _http_h2.BufferedH2Connection.send_headers

    def send_headers(self: Any, stream_id: int, headers: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(headers, list) and len(headers) == 3 and headers[1:] == page_headers:
            headers = [headers[0], *h2_headers(int(headers[0][1]))]
        return original_send_headers(self, stream_id, headers, *args, **kwargs)

    _http_h2.BufferedH2Connection.send_headers = send_headers  # type: ignore[method-assign]
    _http1._portcullis_installed = True  # type: ignore[attr-defined]
