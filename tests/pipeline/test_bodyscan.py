"""addons/pipeline/bodyscan.py: a held body read whole, a streamed body searched as it passes — never one
byte of a needle sent, whatever the chunking; the framing (length) kept; the search bounded."""

from __future__ import annotations

import random

import pytest

from addons.pipeline.bodyscan import StreamScan, leaked_in
from addons.policy.credentials import Credential
from tests.policy.test_credentials import PLACEHOLDER, VALUE, cred

GH = cred()
OTHER = cred("other", "other-secret-value-77", ("portcullis-credential-other",))


def stream(scan: StreamScan, body: bytes, cuts: list[int]) -> list[bytes]:
    """Feed `body` cut at `cuts`, then the end of the body; every chunk the scanner emits."""
    out: list[bytes] = []
    last = 0
    for c in [*sorted(cuts), len(body)]:
        out += scan(body[last:c]) if c > last else []
        last = c
    return out + scan(b"")


@pytest.mark.parametrize(
    ("body", "hit"),
    [
        (b'{"token": "' + VALUE.encode() + b'"}', GH),
        (b"q=" + PLACEHOLDER.encode(), GH),
        (b"a" * 5000 + PLACEHOLDER.encode().upper(), GH),  # case-folded
        (b"portcullis-credential-other", OTHER),
        (b"nothing to see", None),
        (b"", None),
    ],
)
def test_a_held_body_is_read_whole(body: bytes, hit: Credential | None) -> None:
    assert leaked_in(body, (GH, OTHER)) is hit


def test_a_held_body_is_read_up_to_the_bound_only() -> None:
    body = b"x" * 100 + VALUE.encode()
    assert leaked_in(body, (GH,), limit=200) is GH
    assert leaked_in(body, (GH,), limit=100) is None


@pytest.mark.parametrize("seed", range(40))
def test_no_byte_of_a_needle_is_ever_sent_whatever_the_chunking(seed: int) -> None:
    rnd = random.Random(seed)
    needle = rnd.choice([VALUE, PLACEHOLDER]).encode()
    at = rnd.randrange(0, 3000)
    noise = bytes(rnd.randrange(32, 127) for _ in range(at)).replace(b"p", b"q").replace(b"g", b"h")
    body = noise + needle + b"tail" * rnd.randrange(0, 50)
    cuts = sorted(rnd.sample(range(1, len(body)), min(len(body) - 1, rnd.randrange(0, 30))))
    scan = StreamScan((GH,))
    sent = stream(scan, body, cuts)
    joined = b"".join(sent)
    assert scan.hit is GH
    assert len(joined) == len(body)  # overwritten in place: the declared length still holds
    assert joined[at : at + len(needle)] == b"*" * len(needle)
    assert joined[:at] == body[:at] and joined[at + len(needle) :] == body[at + len(needle) :]
    assert all(chunk for chunk in sent)  # never an empty chunk (HTTP/1 chunked reads it as the end)


def test_an_innocent_body_passes_unchanged_and_in_order() -> None:
    body = bytes(range(256)) * 50
    scan = StreamScan((GH, OTHER))
    assert b"".join(stream(scan, body, list(range(7, len(body), 977)))) == body
    assert scan.hit is None


def test_the_search_is_bounded_and_the_rest_passes() -> None:
    scan = StreamScan((GH,), limit=1000)
    body = b"a" * 2000 + VALUE.encode()
    assert b"".join(stream(scan, body, [500, 1200, 1500])) == body  # past the bound: not searched
    assert scan.hit is None
    early = StreamScan((GH,), limit=1000)
    body = b"a" * 10 + VALUE.encode() + b"b" * 5000
    assert VALUE.encode() not in b"".join(stream(early, body, [12, 900, 3000])) and early.hit is GH


def test_nothing_is_held_back_without_needles_and_chunks_wait_only_as_long_as_a_needle() -> None:
    scan = StreamScan((GH,))
    first = scan(b"x" * 10)
    assert first == []  # shorter than a needle: held until more comes (or the end)
    second = scan(b"y" * 100)
    assert len(b"".join(second)) == 110 - (GH.longest_needle - 1)
    assert scan(b"") == [b"y" * (GH.longest_needle - 1)]
    assert StreamScan(())(b"abc") == [b"abc"]
