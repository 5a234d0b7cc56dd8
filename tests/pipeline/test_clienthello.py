"""The tunnel first-bytes reader (addons/pipeline/clienthello.py): table-driven, no sockets."""

from __future__ import annotations

import pytest

from addons.pipeline.clienthello import MAX_CLIENT_HELLO, MAX_RECORD, HandshakeWatch, Kind, read_first_bytes
from tests.tlsbytes import (
    CCS,
    ECH,
    alpn_ext,
    client_hello,
    ext,
    real_hello,
    reframe,
    server_hello,
    server_name_ext,
)

HELLO = real_hello("public.test")

TLS_CASES = [
    ("real hello", HELLO, "public.test"),
    ("real hello, no sni", real_hello(None), None),
    ("built hello", client_hello([b"public.test"]), "public.test"),
    ("no extensions at all", client_hello(None), None),
    ("record version 0x0304", reframe(HELLO, 0x0304), "public.test"),
    ("record version 0x0300", reframe(HELLO, 0x0300), "public.test"),
    ("record version 0x0100", reframe(HELLO, 0x0100), "public.test"),
    ("record version 0xffff", reframe(HELLO, 0xFFFF), "public.test"),
    ("split over records", reframe(HELLO, 0x0301, [1, 2, 40]), "public.test"),
    ("one byte per record", reframe(HELLO, 0x0303, [1] * 120), "public.test"),
    ("upper case name", client_hello([b"PUBLIC.TEST"]), "PUBLIC.TEST"),
    ("trailing dot", client_hello([b"public.test."]), "public.test."),
]


@pytest.mark.parametrize(("data", "sni"), [c[1:] for c in TLS_CASES], ids=[c[0] for c in TLS_CASES])
def test_tls_hellos_are_read_with_their_server_name(data, sni):
    fb = read_first_bytes(data)
    assert fb.kind is Kind.TLS, fb
    assert fb.sni == sni


def test_alpn_is_read():
    fb = read_first_bytes(client_hello([b"public.test"], extra=[alpn_ext([b"h2", b"http/1.1"])]))
    assert fb.alpn == (b"h2", b"http/1.1")


LONG_LABEL = b"a" * 64 + b".test"
BAD_CASES = [
    ("label over 63 octets", client_hello([LONG_LABEL]), "not a valid host name"),
    ("empty label", client_hello([b"blocked..test"]), "not a valid host name"),
    ("two trailing dots", client_hello([b"blocked.test.."]), "not a valid host name"),
    ("leading dot", client_hello([b".blocked.test"]), "not a valid host name"),
    ("empty name", client_hello([b""]), "not a valid host name"),
    ("space in name", client_hello([b"blocked .test"]), "not a valid host name"),
    ("nul in name", client_hello([b"public.test\x00blocked.test"]), "not a valid host name"),
    ("utf-8 name", client_hello(["bl\u00f6cked.test".encode()]), "not a valid host name"),
    ("ip v6 literal", client_hello([b"::1"]), "not a valid host name"),
    ("name too long", client_hello([b".".join([b"a" * 63] * 5)]), "not a valid host name"),
    ("two names", client_hello([b"public.test", b"blocked.test"]), "lists 2 names"),
    ("no names", client_hello([]), "lists 0 names"),
    ("name type 1", client_hello([(1, b"blocked.test")]), "type 1"),
    ("extension twice", client_hello([b"public.test"], extra=[server_name_ext([b"blocked.test"])]), "twice"),
    ("empty extension body", client_hello(raw_sni_ext=ext(0, b"")), "truncated"),
    ("list length lies", client_hello(raw_sni_ext=ext(0, b"\x00\x40\x00\x00\x04abcd")), "truncated"),
    ("bytes after list", client_hello(raw_sni_ext=ext(0, b"\x00\x07\x00\x00\x04abcdXX")), "after the server"),
    ("encrypted client hello", client_hello([b"public.test"], extra=[ext(ECH, b"\x00" * 8)]), "hides"),
    ("esni", client_hello([b"public.test"], extra=[ext(0xFFCE, b"\x00" * 8)]), "hides"),
    ("not a client hello", b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "not a ClientHello"),
    ("empty handshake record", b"\x16\x03\x01\x00\x00" + HELLO, "empty handshake record"),
    ("oversized record", b"\x16\x03\x01" + (MAX_RECORD + 1).to_bytes(2, "big"), None),
    ("alert record first", b"\x15\x03\x01\x00\x02\x01\x00" + HELLO, "other than a handshake"),
    ("ccs record first", b"\x14\x03\x03\x00\x01\x01" + HELLO, "other than a handshake"),
    ("another record inside", reframe(HELLO, 0x0301, [30])[:35] + b"\x17" + reframe(HELLO)[36:], "type 23"),
    ("garbage hello body", b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\xff\xff\xff\xff", "truncated"),
    ("bytes after extensions", None, "after the extensions"),
]


def _trailing_after_extensions() -> bytes:
    msg = bytearray(reframe(HELLO)[5:])
    msg += b"\x00"
    msg[1:4] = (len(msg) - 4).to_bytes(3, "big")
    return b"\x16\x03\x01" + len(msg).to_bytes(2, "big") + bytes(msg)


@pytest.mark.parametrize(("data", "why"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_tls_shaped_bytes_that_are_not_one_clean_name_are_bad(data, why):
    if data is None:
        data = _trailing_after_extensions()
    fb = read_first_bytes(data)
    if why is None:  # an oversized record header is refused before its body arrives
        data = data + b"\x00" * (MAX_RECORD + 1)
        fb = read_first_bytes(data)
    assert fb.kind is Kind.BAD, fb
    assert why is None or why in (fb.problem or ""), fb.problem


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"SSH-2.0-x\r\n",
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
        b"\x80\x2e\x01\x03\x01",
        b"\x15\x00\x00",
        b"\x17garbage",
    ],
    ids=["http", "ssh", "postgres-sslrequest", "sslv2-hello", "type21-not-v3", "type23-not-v3"],
)
def test_bytes_no_server_reads_as_tls(data):
    assert read_first_bytes(data).kind is Kind.NOT_TLS


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x16",
        b"\x16\x03",
        b"\x16\x03\x01\x00",
        HELLO[:20],
        HELLO[:-1],
        reframe(HELLO, 0x0301, [10])[:18],
        b"\x15",
    ],
    ids=["empty", "1", "2", "4", "partial-body", "one-short", "second-record-header", "type21-1-byte"],
)
def test_incomplete_hellos_wait_for_more(data):
    assert read_first_bytes(data).kind is Kind.NEED_MORE


def test_a_hello_too_large_to_wait_for_is_refused_at_once():
    # The claimed size bounds what is buffered (records are never empty): past the limit, refuse.
    fb = read_first_bytes(b"\x16\x03\x01\x00\x04\x01" + (MAX_CLIENT_HELLO + 1).to_bytes(3, "big"))
    assert fb.kind is Kind.BAD and "too large" in (fb.problem or "")


# ---- the cleartext handshake after the first ClientHello (HelloRetryRequest) -------------------


def _watch(expected: str = "public.test") -> HandshakeWatch:
    return HandshakeWatch(lambda hello: None if hello.sni == expected else f"names {hello.sni}")


def test_a_plain_server_hello_ends_the_watch():
    w = _watch()
    assert w.client(HELLO) is None and not w.done
    w.server(server_hello(retry=False))
    assert w.done
    assert w.client(CCS + client_hello([b"blocked.test"])) is None  # encrypted from here: not read


def test_a_second_hello_after_a_retry_request_is_judged():
    w = _watch()
    assert w.client(HELLO) is None
    w.server(server_hello(retry=True))
    assert not w.done
    assert w.client(CCS + client_hello([b"blocked.test"])) == "names blocked.test"


def test_a_second_hello_naming_the_authority_ends_the_watch():
    w = _watch()
    w.client(HELLO)
    w.server(server_hello(retry=True)[:7])  # split over reads
    w.server(server_hello(retry=True)[7:])
    second = CCS + client_hello([b"public.test"])
    assert w.client(second[:20]) is None and w.client(second[20:]) is None
    assert w.done


def test_a_second_hello_sent_before_the_retry_request_is_judged_too():
    w = _watch()
    assert w.client(HELLO + client_hello([b"blocked.test"])) == "names blocked.test"


def test_a_third_hello_is_refused_and_malformed_ones_too():
    w = _watch()
    assert w.client(HELLO + client_hello([b"public.test"])) is None
    assert "third" in (w.client(client_hello([b"public.test"])) or "")
    w2 = _watch()
    w2.client(HELLO)
    w2.server(server_hello(retry=True))
    assert "malformed" in (w2.client(client_hello([b"public.test", b"blocked.test"])) or "")


def test_early_data_and_ccs_records_are_skipped_not_parsed():
    w = _watch()
    early = b"\x17\x03\x03\x00\x05\x01\x00\x00\x01\xff"  # looks like a handshake header inside
    assert w.client(HELLO + CCS + early) is None and not w.done
