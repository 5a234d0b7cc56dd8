"""addons/pipeline/firstbytes.py: a tunnel's first bytes judged against its CONNECT outcome (wait, relay
raw, pass TLS through watched, intercept, or refuse with the reason), the server-name check, and the
watch over a passed-through handshake (the reader itself: tests/pipeline/test_clienthello.py)."""

from __future__ import annotations

import pytest

from addons.pipeline.clienthello import FirstBytes, Kind
from addons.pipeline.firstbytes import Relay, handshake_watch, judge_first_bytes, sni_problem
from addons.pipeline.model import Outcome
from addons.policy.model import Action, Client, Layer, Reason, Request
from tests.tlsbytes import CCS, client_hello, ext, server_hello


def tunnel(host: str = "public.test", *, inspect: bool = False, raw_tcp: bool = False) -> Outcome:
    req = Request(host, 443, Client("10.0.0.1"), None, "CONNECT", None, Layer.CONNECT, "t1")
    return Outcome(req, Action.ALLOW, Reason.RULE, inspect=inspect, raw_tcp=raw_tcp)


PLAIN, INSPECT, RAW, RAW_INSPECT = (
    tunnel(),
    tunnel(inspect=True),
    tunnel(raw_tcp=True),
    tunnel(inspect=True, raw_tcp=True),
)
IP = tunnel("8.8.8.8")
HELLO = client_hello([b"public.test"])
NOT_TLS = b"SSH-2.0-OpenSSH_9.6\r\n"

CASES = [
    # id, tunnel, client bytes, server spoke, (relay, problem fragment)
    ("nothing-yet", PLAIN, b"", False, (Relay.WAIT, None)),
    ("partial-hello", PLAIN, HELLO[:20], False, (Relay.WAIT, None)),
    ("partial-hello-server-spoke", PLAIN, HELLO[:20], True, (Relay.WAIT, None)),
    ("hello", PLAIN, HELLO, False, (Relay.TLS, None)),
    ("hello-uppercase-dot", PLAIN, client_hello([b"PUBLIC.TEST."]), False, (Relay.TLS, None)),
    ("hello-inspect", INSPECT, HELLO, False, (Relay.INSPECT, None)),
    ("hello-raw-tcp", RAW, HELLO, False, (Relay.TLS, None)),
    (
        "other-sni",
        PLAIN,
        client_hello([b"evil.test"]),
        False,
        (Relay.REFUSE, "differs from the CONNECT host"),
    ),
    ("other-sni-raw", RAW, client_hello([b"evil.test"]), False, (Relay.REFUSE, "differs")),
    ("no-sni", PLAIN, client_hello(None), False, (Relay.REFUSE, "has no server name")),
    ("no-sni-inspect", INSPECT, client_hello(None), False, (Relay.REFUSE, "has no server name")),
    ("no-sni-ip", IP, client_hello(None), False, (Relay.TLS, None)),
    ("no-sni-raw", RAW, client_hello(None), False, (Relay.TLS, None)),
    ("name-sni-on-ip", IP, client_hello([b"public.test"]), False, (Relay.REFUSE, "differs")),
    ("two-names", PLAIN, client_hello([b"public.test", b"evil.test"]), False, (Relay.REFUSE, None)),
    ("bad-record", PLAIN, CCS + HELLO, False, (Relay.REFUSE, "other than a handshake")),
    ("not-tls", PLAIN, NOT_TLS, False, (Relay.REFUSE, "not a TLS ClientHello")),
    ("not-tls-inspect", INSPECT, NOT_TLS, False, (Relay.REFUSE, "not a TLS ClientHello")),
    ("not-tls-raw", RAW, NOT_TLS, False, (Relay.RAW, None)),
    ("not-tls-raw-inspect", RAW_INSPECT, NOT_TLS, False, (Relay.REFUSE, "not a TLS ClientHello")),
    ("server-first", PLAIN, b"", True, (Relay.REFUSE, "the server spoke first")),
    ("server-first-raw", RAW, b"", True, (Relay.RAW, None)),
    ("server-first-raw-inspect", RAW_INSPECT, b"", True, (Relay.REFUSE, "the server spoke first")),
]


@pytest.mark.parametrize(
    ("t", "data", "server_spoke", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_judge_first_bytes(
    t: Outcome, data: bytes, server_spoke: bool, want: tuple[Relay, str | None]
) -> None:
    relay, problem = judge_first_bytes(t, data, server_spoke)
    assert relay is want[0]
    if relay is Relay.REFUSE:
        assert problem  # a refusal always says why (it becomes the sni_mismatch decision's detail)
        if want[1] is not None:
            assert want[1] in problem
    else:
        assert problem is None


@pytest.mark.parametrize(
    ("host", "sni", "raw_tcp", "problem"),
    [
        ("public.test", "public.test", False, None),
        ("public.test", "Public.Test.", False, None),
        ("xn--bcher-kva.de", "xn--bcher-kva.de", False, None),
        ("public.test", "evil.test", False, "differs"),
        ("public.test", "a..b", False, "differs"),  # present but not a host name: never "absent"
        ("public.test", None, False, "no server name"),
        ("public.test", None, True, None),
        ("8.8.8.8", None, False, None),
        ("8.8.8.8", "8.8.8.8", False, None),
    ],
)
def test_sni_problem(host: str, sni: str | None, raw_tcp: bool, problem: str | None) -> None:
    got = sni_problem(tunnel(host, raw_tcp=raw_tcp), FirstBytes(Kind.TLS, sni=sni))
    assert (got is None) if problem is None else (got is not None and problem in got)


def test_the_handshake_watch_judges_a_second_hello_against_the_same_tunnel() -> None:
    w = handshake_watch(PLAIN)
    assert w.client(HELLO) is None and not w.done
    w.server(server_hello(retry=True))  # HelloRetryRequest: a second ClientHello follows in the clear
    assert not w.done
    problem = w.client(client_hello([b"evil.test"]))
    assert problem is not None and "differs" in problem


def test_the_handshake_watch_passes_a_matching_second_hello_and_stops() -> None:
    w = handshake_watch(PLAIN)
    assert w.client(HELLO) is None
    w.server(server_hello(retry=True))
    assert w.client(client_hello([b"public.test"])) is None and w.done


def test_the_handshake_watch_stops_at_a_plain_server_hello() -> None:
    w = handshake_watch(PLAIN)
    assert w.client(HELLO) is None
    w.server(server_hello(retry=False))
    assert w.done and w.client(client_hello([b"evil.test"])) is None  # encrypted from here on


def test_extensions_that_hide_the_name_are_refused() -> None:
    ech = client_hello([b"public.test"], extra=[ext(0xFE0D, b"\x00" * 8)])
    relay, problem = judge_first_bytes(PLAIN, ech, False)
    assert relay is Relay.REFUSE and problem
