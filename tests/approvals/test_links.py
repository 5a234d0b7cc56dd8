"""Decision-link capabilities (addons/approvals/links.py): one approval, an expiry, nothing else."""

from __future__ import annotations

import pytest

from addons.approvals.errors import ApprovalError
from addons.approvals.links import Links
from addons.config.models import LinksConfig

KEY = b"k" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_capability_decides_its_approval_until_it_expires():
    clock = Clock()
    links = Links(KEY, ttl=600, clock=clock)
    cap = links.capability("apr_1", approval_expires_at=2000.0)
    assert links.problem("apr_1", cap) is None
    clock.now = 1599
    assert links.problem("apr_1", cap) is None
    clock.now = 1600
    assert links.problem("apr_1", cap) == "this decision link has expired"


def test_it_never_outlives_its_approval():
    clock = Clock()
    links = Links(KEY, ttl=3600, clock=clock)
    cap = links.capability("apr_1", approval_expires_at=1100.0)
    clock.now = 1100
    assert links.problem("apr_1", cap) == "this decision link has expired"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda cap: cap[:-1] + ("0" if cap[-1] != "0" else "1"),  # signature
        lambda cap: str(int(cap.split(".")[0]) + 10_000) + cap[cap.index(".") :],  # a later expiry
        lambda cap: cap.split(".")[0] + ".ffffffffffffffff." + cap.split(".")[2],  # another nonce
        lambda cap: cap.replace(".", "", 1),
        lambda cap: "",
    ],
    ids=["signature", "expiry", "nonce", "shape", "empty"],
)
def test_a_tampered_capability_is_refused(mutate):
    links = Links(KEY, ttl=600, clock=Clock())
    cap = links.capability("apr_1", 2000.0)
    assert links.problem("apr_1", mutate(cap)) is not None


def test_a_capability_is_for_one_approval_and_one_key():
    links = Links(KEY, ttl=600, clock=Clock())
    cap = links.capability("apr_1", 2000.0)
    assert links.problem("apr_2", cap) == "this decision link is not valid for this approval"
    other = Links(b"o" * 32, ttl=600, clock=Clock())
    assert other.problem("apr_1", cap) == "this decision link is not valid for this approval"


def test_the_url_and_the_config():
    links = Links(KEY, ttl=600, clock=Clock())
    url = links.url("http://127.0.0.1:9090/", "apr_1", 2000.0)
    assert url.startswith("http://127.0.0.1:9090/approvals/apr_1/link?cap=")
    assert Links.from_config(None) is None
    made = Links.from_config(LinksConfig(secret_env="LINK_KEY"), environ={"LINK_KEY": "x" * 20})
    assert made is not None and made.ttl == 900.0
    with pytest.raises(ApprovalError, match="LINK_KEY is not set"):
        Links.from_config(LinksConfig(secret_env="LINK_KEY"), environ={})
    with pytest.raises(ApprovalError, match="at least 16 bytes"):
        Links(b"short", ttl=1)
