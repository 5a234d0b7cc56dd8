"""The shape of a request the proxy is asked to forward: anything a lenient upstream could read
differently from the proxy is a `bad_request` (RFC 9110 §5.5, RFC 9112 §2.2, §3.2, §5.2), and so is a
request head over the size limits (414 for the request line or target, 431 for the header fields)."""

from __future__ import annotations

import re
from collections.abc import Iterable

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Field values: visible ASCII, obs-text, SP and HTAB. CR, LF (obsolete line folding), NUL and the
# other control characters are refused, never forwarded.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Request target: origin-form, visible ASCII only (no space, no control character, no raw UTF-8).
_ORIGIN_FORM = re.compile(rb"/[\x21-\x7e]*")
SCHEMES = frozenset({"http", "https"})

# Size limits of a request head (nginx and Apache refuse request lines over 8 KiB with 414; Squid's
# whole-head default is 64 KiB). HTTP/1 heads are measured as they arrive, before mitmproxy buffers
# more (addons/proxy/mitm_compat/parsing.py); HTTP/2 heads (bounded to 64 KiB decoded by h2) once parsed.
MAX_REQUEST_LINE = 8192  # bytes: the request line (HTTP/1) or the request target; else 414
MAX_HEADER_FIELDS = 65536  # bytes: every header field line with its line end ("name: value\r\n"); else 431
URI_TOO_LONG, FIELDS_TOO_LARGE = 414, 431
_LINE_TOO_LONG = f"the request line is longer than {MAX_REQUEST_LINE} bytes"
_TARGET_TOO_LONG = f"the request target is longer than {MAX_REQUEST_LINE} bytes"
_FIELDS_TOO_LARGE = f"the header fields are larger than {MAX_HEADER_FIELDS} bytes"
_EMPTY_LINES = re.compile(rb"(?:\r?\n)*")
_HEAD_END = re.compile(rb"\n\r?\n")  # how h11 (mitmproxy's HTTP/1 reader) finds the end of a head


def request_problem(
    method: bytes,
    scheme: str,
    path: bytes,
    fields: Iterable[tuple[bytes, bytes]],
    *,
    absolute_form: bool,
) -> str | None:
    """Why this request must not be forwarded, or None.

    `path` is the request target as mitmproxy will send it (HTTP/1: the origin-form part; HTTP/2:
    `:path` as received); `absolute_form` is an HTTP/1 absolute-form target inside a tunnel, where
    only origin-form is allowed.
    """
    if not _TOKEN.fullmatch(method):
        return "the method is not a token"
    if scheme not in SCHEMES:
        return "the scheme is not http or https"
    if absolute_form:
        return "inside a tunnel the request target must be a path (origin-form)"
    if not _ORIGIN_FORM.fullmatch(path):
        return "the request target is not an origin-form path of visible ASCII characters"
    for name, value in fields:
        if not _TOKEN.fullmatch(name):
            return "a header name is not a token"
        if _BAD_VALUE.search(value):
            return "a header value holds CR, LF (line folding), NUL or another control character"
    return None


# Seconds an HTTP/1 request head may take from its first byte to its blank line (network.header_timeout).
HEAD_TIMEOUT_S = 30.0


def head_too_large(data: bytes) -> tuple[int, str] | None:
    """(414 or 431, why) when the start of an HTTP/1 request head as buffered so far, complete or not,
    already breaks a size limit; None while it may still fit. Leading empty lines are not counted."""
    m = _EMPTY_LINES.match(data)
    start = m.end() if m else 0
    eol = data.find(b"\n", start, start + MAX_REQUEST_LINE + 2)
    if eol < 0:
        return (URI_TOO_LONG, _LINE_TOO_LONG) if len(data) - start > MAX_REQUEST_LINE + 1 else None
    line = eol - start - (1 if eol > start and data[eol - 1] == 0x0D else 0)
    if line > MAX_REQUEST_LINE:
        return URI_TOO_LONG, _LINE_TOO_LONG
    end = _HEAD_END.search(data, eol, eol + MAX_HEADER_FIELDS + 3)
    if end is None:  # not complete within the limit: too large once more than that is buffered
        return (FIELDS_TOO_LARGE, _FIELDS_TOO_LARGE) if len(data) >= eol + MAX_HEADER_FIELDS + 3 else None
    return (FIELDS_TOO_LARGE, _FIELDS_TOO_LARGE) if end.start() - eol > MAX_HEADER_FIELDS else None


def size_problem(target: bytes, fields: Iterable[tuple[bytes, bytes]]) -> tuple[int, str] | None:
    """(414 or 431, why) for a parsed request (HTTP/2 above all: HTTP/1 heads are bounded as they
    arrive) whose target or header fields break a size limit."""
    if len(target) > MAX_REQUEST_LINE:
        return URI_TOO_LONG, _TARGET_TOO_LONG
    if sum(len(n) + len(v) + 4 for n, v in fields) > MAX_HEADER_FIELDS:
        return FIELDS_TOO_LARGE, _FIELDS_TOO_LARGE
    return None
