"""addons/pipeline/requestform.py: a request is forwarded only in a shape no lenient upstream can read
differently from the proxy; everything else is a bad_request problem (the end-to-end proof is
tests/proxy/e2e/test_bypass_http.py)."""

from __future__ import annotations

import pytest

from addons.pipeline.requestform import (
    MAX_HEADER_FIELDS,
    MAX_REQUEST_LINE,
    SCHEMES,
    head_too_large,
    request_problem,
    size_problem,
)

OK_FIELDS = [(b"Host", b"public.test"), (b"Accept", b"*/*"), (b"X-Tab", b"a\tb"), (b"X-Obs", b"caf\xe9")]


@pytest.mark.parametrize(
    ("method", "scheme", "path"),
    [
        (b"GET", "http", b"/"),
        (b"POST", "https", b"/a/b?c=d&e=%20#f"),
        (b"PROPFIND", "http", b"/~user/x"),
        (b"M-SEARCH", "http", b"/!$&'()*+,;=:@"),
    ],
)
def test_a_clean_request_has_no_problem(method: bytes, scheme: str, path: bytes) -> None:
    assert request_problem(method, scheme, path, OK_FIELDS, absolute_form=False) is None


PROBLEMS = [
    # id, method, scheme, path, fields, absolute_form, problem
    ("method-space", b"GE T", "http", b"/", [], False, "the method is not a token"),
    ("method-empty", b"", "http", b"/", [], False, "the method is not a token"),
    ("method-utf8", "GÉT".encode(), "http", b"/", [], False, "the method is not a token"),
    ("scheme-ftp", b"GET", "ftp", b"/", [], False, "the scheme is not http or https"),
    ("scheme-ws", b"GET", "ws", b"/", [], False, "the scheme is not http or https"),
    ("absolute-form", b"GET", "https", b"/", [], True, "inside a tunnel the request target must be a path"),
    ("path-not-slash", b"GET", "http", b"x/y", [], False, "origin-form path"),
    ("path-space", b"GET", "http", b"/a b", [], False, "origin-form path"),
    ("path-tab", b"GET", "http", b"/a\tb", [], False, "origin-form path"),
    ("path-raw-utf8", b"GET", "http", "/ü".encode(), [], False, "origin-form path"),
    ("path-absolute", b"GET", "http", b"http://evil.test/", [], False, "origin-form path"),
    ("path-asterisk", b"OPTIONS", "http", b"*", [], False, "origin-form path"),
    ("path-empty", b"GET", "http", b"", [], False, "origin-form path"),
    ("name-space", b"GET", "http", b"/", [(b"X A", b"b")], False, "a header name is not a token"),
    ("name-colon", b"GET", "http", b"/", [(b"X:A", b"b")], False, "a header name is not a token"),
    ("name-empty", b"GET", "http", b"/", [(b"", b"b")], False, "a header name is not a token"),
    ("value-cr", b"GET", "http", b"/", [(b"X", b"a\rb")], False, "CR, LF"),
    ("value-lf-folding", b"GET", "http", b"/", [(b"X", b"a\n b")], False, "CR, LF"),
    ("value-nul", b"GET", "http", b"/", [(b"X", b"a\x00b")], False, "NUL"),
    ("value-esc", b"GET", "http", b"/", [(b"X", b"\x1b[31m")], False, "control character"),
    ("value-del", b"GET", "http", b"/", [(b"X", b"a\x7f")], False, "control character"),
    ("second-field", b"GET", "http", b"/", [(b"Host", b"ok"), (b"X", b"a\x01")], False, "control character"),
]


@pytest.mark.parametrize(
    ("method", "scheme", "path", "fields", "absolute_form", "problem"),
    [p[1:] for p in PROBLEMS],
    ids=[p[0] for p in PROBLEMS],
)
def test_anything_read_differently_is_a_problem(
    method: bytes,
    scheme: str,
    path: bytes,
    fields: list[tuple[bytes, bytes]],
    absolute_form: bool,
    problem: str,
) -> None:
    got = request_problem(method, scheme, path, fields, absolute_form=absolute_form)
    assert got is not None and problem in got


def test_the_first_problem_is_reported() -> None:
    got = request_problem(b"GE T", "ftp", b"x", [(b"X A", b"\x00")], absolute_form=True)
    assert got == "the method is not a token"


def test_only_http_and_https() -> None:
    assert frozenset({"http", "https"}) == SCHEMES


# -- size limits ------------------------------------------------------------------------------------

LINE = b"GET / HTTP/1.1\r\n"


def fields(size: int) -> bytes:
    """Header field lines of exactly `size` bytes, line ends included."""
    out, left = b"", size
    while left > 2048:
        out += b"X-A: " + b"a" * (1024 - 7) + b"\r\n"
        left -= 1024
    out += b"X-B: " + b"b" * (left - 7) + b"\r\n"
    assert len(out) == size
    return out


HEADS = [
    # id, buffered bytes, answer
    ("small", LINE + b"Host: a\r\n\r\n", None),
    ("line-at-limit", b"G" * MAX_REQUEST_LINE + b"\r\n", None),
    ("line-at-limit-lf", b"G" * MAX_REQUEST_LINE + b"\n", None),
    ("line-over", b"G" * (MAX_REQUEST_LINE + 1) + b"\r\n", 414),
    ("line-over-incomplete", b"G" * (MAX_REQUEST_LINE + 2), 414),
    ("line-incomplete-may-fit", b"G" * (MAX_REQUEST_LINE + 1), None),  # the CR of its CRLF may follow
    ("leading-empty-lines-do-not-count", b"\r\n" * 5000 + b"G" * MAX_REQUEST_LINE + b"\r\n", None),
    ("fields-at-limit", LINE + fields(MAX_HEADER_FIELDS) + b"\r\n", None),
    ("fields-over", LINE + fields(MAX_HEADER_FIELDS + 1) + b"\r\n", 431),
    ("fields-at-limit-incomplete", LINE + fields(MAX_HEADER_FIELDS), None),
    ("fields-over-incomplete", LINE + fields(MAX_HEADER_FIELDS) + b"X-", 431),
    ("no-fields", LINE + b"\r\n", None),
    ("lf-only-head", b"GET / HTTP/1.1\nHost: a\n\n", None),
]


@pytest.mark.parametrize(("data", "status"), [h[1:] for h in HEADS], ids=[h[0] for h in HEADS])
def test_a_head_is_measured_as_it_arrives(data: bytes, status: int | None) -> None:
    got = head_too_large(data)
    assert (got[0] if got else None) == status
    if got is not None:
        assert str(MAX_REQUEST_LINE if status == 414 else MAX_HEADER_FIELDS) in got[1]


def test_the_limits_are_the_documented_ones() -> None:
    assert (MAX_REQUEST_LINE, MAX_HEADER_FIELDS) == (8192, 65536)


@pytest.mark.parametrize(
    ("target", "flds", "status"),
    [
        (b"/" + b"a" * (MAX_REQUEST_LINE - 1), [(b"Host", b"h")], None),
        (b"/" + b"a" * MAX_REQUEST_LINE, [], 414),
        (b"/", [(b"X", b"v" * (MAX_HEADER_FIELDS - 5))], None),  # "X: " + value + CRLF
        (b"/", [(b"X", b"v" * (MAX_HEADER_FIELDS - 4))], 431),
        (b"/", [(b"X", b"v")] * 20000, 431),
    ],
    ids=["target-at-limit", "target-over", "fields-at-limit", "fields-over", "many-fields"],
)
def test_a_parsed_request_over_the_limits(
    target: bytes, flds: list[tuple[bytes, bytes]], status: int | None
) -> None:
    got = size_problem(target, flds)
    assert (got[0] if got else None) == status
