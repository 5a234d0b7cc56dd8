"""addons/pipeline/requestform.py: a request is forwarded only in a shape no lenient upstream can read
differently from the proxy; everything else is a bad_request problem (the end-to-end proof is
tests/proxy/e2e/test_bypass_http.py)."""

from __future__ import annotations

import pytest

from addons.pipeline.requestform import SCHEMES, request_problem

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
