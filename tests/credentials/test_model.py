"""addons/credentials/model.py: a credential's state, its secret check, what is shown of it, the hash."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from addons.credentials.model import Credential, State, hash_secret
from addons.pipeline.identity import parse_basic

SECRET = "s3cret-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789_-"


def cred(**kw: object) -> Credential:
    base: dict[str, object] = {
        "task_id": "build-1",
        "profile": "frontend",
        "labels": (("repo", "web"), ("team", "ui")),
        "secret_hash": hash_secret(SECRET),
        "created_at": 100.0,
        "expires_at": 200.0,
        "revoked_at": None,
        "minted_by": "admin",
    }
    return Credential(**(base | kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("now", "revoked_at", "state"),
    [
        (100.0, None, State.LIVE),
        (199.999, None, State.LIVE),
        (200.0, None, State.EXPIRED),  # the expiry instant is already expired
        (10_000.0, None, State.EXPIRED),
        (150.0, 120.0, State.REVOKED),
        (300.0, 120.0, State.REVOKED),  # revoked beats expired: what happened first is what it says
    ],
)
def test_state(now, revoked_at, state):
    assert cred(revoked_at=revoked_at).state(now) is state


@pytest.mark.parametrize(
    ("presented", "ok"),
    [
        (SECRET, True),
        (SECRET + "x", False),
        (SECRET[:-1], False),
        ("", False),
        (SECRET.upper(), False),
        (hash_secret(SECRET), False),  # the stored hash is not a password
        (" " + SECRET, False),
    ],
)
def test_matches(presented, ok):
    assert cred().matches(presented) is ok


def test_public_never_shows_the_hash_and_says_the_state():
    c = cred(revoked_at=150.0)
    doc = c.public(160.0)
    assert doc == {
        "task_id": "build-1",
        "profile": "frontend",
        "labels": {"repo": "web", "team": "ui"},
        "state": "revoked",
        "created_at": 100.0,
        "expires_at": 200.0,
        "revoked_at": 150.0,
        "minted_by": "admin",
    }
    text = json.dumps(doc)
    assert c.secret_hash not in text and "hash" not in text
    assert cred().public(100.0)["state"] == "live" and cred().public(250.0)["state"] == "expired"


def test_hash_secret_is_sha256_hex():
    assert hash_secret(SECRET) == hashlib.sha256(SECRET.encode()).hexdigest()
    assert len(hash_secret("")) == 64 and hash_secret("a") != hash_secret("b")
    assert hash_secret("pässwörd") == hashlib.sha256("pässwörd".encode()).hexdigest()


def test_a_secret_that_is_not_utf8_is_hashed_not_a_crash():
    """parse_basic keeps bytes that are not UTF-8 as surrogates; checking them refuses, never raises."""
    header = "Basic " + base64.b64encode(b"build-1:\xff\xfe" + SECRET.encode()).decode()
    parsed = parse_basic(header)
    assert parsed is not None
    user, secret = parsed
    assert user == "build-1" and secret != SECRET
    assert len(hash_secret(secret)) == 64
    assert cred().matches(secret) is False
