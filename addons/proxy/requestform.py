"""The shape of a request the proxy is asked to forward: anything a lenient upstream could read
differently from the proxy is a `bad_request` (RFC 9110 §5.5, RFC 9112 §2.2, §3.2, §5.2)."""

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
