"""addons/config/settings.py: the config values decisions need (listen addresses, allow_cidrs, static
resolve answers, client groups), parsed and checked with the position of every problem; and the
best-effort config that keeps the loader checking after an invalid value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from addons.config.load import load_config
from addons.config.settings import best_effort_config, parse_hostport
from addons.policy.model import Action
from tests.policy.pol_helpers import load_errors, write_config


def test_config_values_are_parsed(tmp_path: Path) -> None:
    lc = load_config(
        write_config(
            tmp_path,
            [],
            listen="[::1]:8080",
            network={
                "allow_cidrs": ["::ffff:10.1.0.0/112", "192.168.0.7"],
                "resolve": {"A.test": ["127.0.0.2", "0x7f000003"]},
            },
            clients=[{"name": "a", "cidrs": ["10.0.0.0/8"]}],
        )
    )
    st = lc.policy.settings
    assert [str(n) for n in st.allow_cidrs] == ["10.1.0.0/16", "192.168.0.7/32"]
    assert st.resolve == {"a.test": ("127.0.0.2", "127.0.0.3")}
    assert st.self_addresses == ("::1",)
    assert lc.resolve_path("state/x.db") == tmp_path / "state/x.db"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:9090", ("::1", 9090)),
        ("LocalHost.:1", ("localhost", 1)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_parse_hostport(text: str, want: tuple[str, int]) -> None:
    assert parse_hostport(text) == want


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1", "is not host:port"),
        (":8080", "is not host:port"),
        ("h:0", "is not host:port"),
        ("h:65536", "is not host:port"),
        ("h:x", "is not host:port"),
        ("::1:8080", "write an IPv6 address in brackets"),
        ("a..b:80", "empty label"),
    ],
)
def test_parse_hostport_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_hostport(text)


def test_the_settings_of_a_valid_config(tmp_path: Path) -> None:
    lc = load_config(
        write_config(
            tmp_path,
            [],
            default_action="approval",
            listen="0.0.0.0:8080",  # a wildcard is no self address
            network={"block_private": False, "resolve": {"one.test": "8.8.8.8"}},
            tls={"inspect": "always"},
            clients=[
                {"name": "ci", "cidrs": ["10.1.0.0/16", "fd00::/8"]},
                {"name": "rev", "proxy_auth": {"user": "r", "password_env": "PW"}},
            ],
        )
    )
    st = lc.policy.settings
    assert (st.default_action, st.block_private, st.inspect, st.self_addresses) == (
        Action.APPROVAL,
        False,
        "always",
        (),
    )
    assert st.resolve == {"one.test": ("8.8.8.8",)}
    ci, rev = st.clients
    assert (ci.name, [str(n) for n in ci.networks], ci.user) == ("ci", ["10.1.0.0/16", "fd00::/8"], None)
    assert (rev.name, rev.networks, rev.user) == ("rev", (), "r")


SETTING_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"listen": "nowhere"}, "listen: 'nowhere' is not host:port"),
    ({"admin": {"listen": "::1:9090"}}, "admin.listen: '::1:9090': write an IPv6 address in brackets"),
    ({"network": {"allow_cidrs": ["10.0.0.1/8"]}}, "network.allow_cidrs: "),
    ({"network": {"allow_cidrs": ["a.test"]}}, "network.allow_cidrs: 'a.test' is not a CIDR or IP address"),
    ({"network": {"resolve": {"a..b": "1.2.3.4"}}}, "network.resolve: "),
    (
        {"network": {"resolve": {"1.2.3.4": "1.2.3.4"}}},
        "network.resolve: '1.2.3.4' is an IP address, not a name",
    ),
    ({"network": {"resolve": {"a.test": "nope"}}}, "network.resolve.a.test: 'nope' is not an IP address"),
    (
        {"network": {"resolve": {"a.test": ["1.1.1.1", "x"]}}},
        "network.resolve.a.test: 'x' is not an IP address",
    ),
    (
        {"clients": [{"name": "a", "cidrs": ["10.0.0.0/8"]}, {"name": "a", "cidrs": ["10.1.0.0/16"]}]},
        "clients: duplicate client name 'a'",
    ),
    ({"clients": [{"name": "empty"}]}, "clients: 'empty' needs cidrs or proxy_auth"),
    ({"clients": [{"name": "c", "cidrs": ["10.0.0.300/8"]}]}, "clients.c.cidrs: "),
]


@pytest.mark.parametrize(("config", "message"), SETTING_ERRORS, ids=[m for _, m in SETTING_ERRORS])
def test_setting_errors_have_a_position(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    errs = load_errors(write_config(tmp_path, [], **config))
    hits = [e for e in errs if message in e]
    assert hits, errs
    path, line, col, _ = hits[0].split(":", 3)
    assert path == str(tmp_path / "portcullis.yaml") and int(line) >= 1 and int(col) >= 1


def test_every_setting_error_is_reported_at_once(tmp_path: Path) -> None:
    errs = load_errors(
        write_config(tmp_path, [], listen="x", network={"allow_cidrs": ["nope"], "resolve": {"a.test": "b"}})
    )
    assert [e.split(": ", 1)[1].split(":")[0] for e in errs] == [
        "listen",
        "network.allow_cidrs",
        "network.resolve.a.test",
    ]


def test_best_effort_config_drops_only_the_invalid_values() -> None:
    cfg = best_effort_config(
        {"listen": "127.0.0.1:1", "default_action": "maybe", "bogus": 1, "network": {"block_private": "x"}}
    )
    assert cfg is not None and cfg.listen == "127.0.0.1:1"
    assert cfg.default_action == "approval" and cfg.network.block_private is True  # defaults instead
    assert best_effort_config({}) is not None
    assert best_effort_config(["not", "a", "mapping"]) is None
