"""addons/config/models.py: the strict config and rule-file models (shape and scalar types only; positions
and cross-checks are the loader's: tests/config/test_load.py)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from addons.config.models import (
    SYSLOG_FACILITIES,
    ApprovalsConfig,
    Config,
    RuleFile,
    RuleModel,
    SyslogConfig,
    SyslogTlsConfig,
    parse_duration,
)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("120s", 120.0), ("5m", 300.0), ("1h", 3600.0), ("1.5m", 90.0), (" 2s ", 2.0), (30, 30.0), (0.5, 0.5)],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("120", "bad duration"),
        ("2d", "bad duration"),
        ("-5s", "bad duration"),
        ("s", "bad duration"),
        (None, "bad duration"),
        (True, "a duration is a number"),
        (0, "greater than zero"),
        ("0s", "greater than zero"),
        (-1, "greater than zero"),
    ],
)
def test_bad_durations(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


def test_defaults() -> None:
    c = Config()
    assert (c.listen, c.admin.listen, c.rules, c.default_action, c.mode) == (
        "127.0.0.1:8080",
        "127.0.0.1:9090",
        ["rules/"],
        "approval",
        "enforce",
    )
    assert (c.approvals.timeout, c.approvals.session_ttl, c.approvals.hold) == (120.0, 3600.0, True)
    assert c.network.block_private is True and c.tls.inspect == "auto" and c.telemetry.syslog is None
    assert c.telemetry.log.on_write_error == "closed"


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"bogus": 1}, "bogus"),
        ({"listen": 8080}, "listen"),  # strict: no int -> str coercion
        ({"listen": ""}, "listen"),
        ({"default_action": "maybe"}, "default_action"),
        ({"mode": "monitor"}, "mode"),
        ({"network": {"block_private": "yes"}}, "network.block_private"),  # strict: no "yes" -> True
        ({"approvals": {"timeout": "forever"}}, "approvals.timeout"),
        ({"approvals": {"webhooks": [{"url": "https://x"}]}}, "approvals.webhooks.0.secret_env"),
        ({"tls": {"inspect": "sometimes"}}, "tls.inspect"),
        ({"telemetry": {"log": {"format": "xml"}}}, "telemetry.log.format"),
        ({"clients": [{"cidrs": ["10.0.0.0/8"]}]}, "clients.0.name"),
    ],
)
def test_the_config_is_strict(data: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError) as e:
        Config.model_validate(data)
    assert where in {".".join(str(p) for p in err["loc"]) for err in e.value.errors()}


def test_models_are_frozen() -> None:
    c = Config()
    with pytest.raises(ValidationError):
        c.listen = "0.0.0.0:1"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("rule", "ok"),
    [
        ({"name": "a", "action": "allow", "hosts": ["a.test"]}, True),
        ({"name": "a", "action": "allow", "hosts": ["a.test"], "ports": [1, 65535], "raw_tcp": True}, True),
        ({"name": "a", "action": "allow", "hosts": []}, False),
        ({"name": "a", "action": "allow"}, False),
        ({"name": "", "action": "allow", "hosts": ["a"]}, False),
        ({"name": "a", "action": "allow", "hosts": ["a"], "ports": [0]}, False),
        ({"name": "a", "action": "allow", "hosts": ["a"], "ports": [65536]}, False),
        ({"name": "a", "action": "allow", "hosts": ["a"], "ports": []}, False),
        ({"name": "a", "action": "allow", "hosts": ["a"], "methods": []}, False),
        ({"name": "a", "action": "allow", "hosts": ["a"], "paths": [""]}, False),
        ({"name": "a", "action": "block", "hosts": ["a"]}, False),
        ({"name": "a", "action": "allow", "hosts": ["a"], "host": "typo"}, False),
    ],
)
def test_rules(rule: dict[str, Any], ok: bool) -> None:
    if ok:
        assert RuleModel.model_validate(rule).name == "a"
    else:
        with pytest.raises(ValidationError):
            RuleModel.model_validate(rule)


def test_a_rule_file_holds_rules_only() -> None:
    assert RuleFile.model_validate({}).rules == []
    with pytest.raises(ValidationError):
        RuleFile.model_validate({"rules": [], "cases": []})


def test_approvals_webhooks() -> None:
    a = ApprovalsConfig.model_validate(
        {"webhooks": [{"url": "https://h/x", "secret_env": "S"}], "timeout": "1m"}
    )
    assert a.webhooks[0].url == "https://h/x" and a.timeout == 60.0


@pytest.mark.parametrize(("name", "code"), [("kern", 0), ("auth", 4), ("local0", 16), ("local7", 23), (5, 5)])
def test_syslog_facilities(name: str | int, code: int) -> None:
    cfg = SyslogConfig.model_validate({"address": "127.0.0.1:514", "transport": "udp", "facility": name})
    assert cfg.facility == code
    assert SYSLOG_FACILITIES["local3"] == 19


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"facility": "local8"}, "unknown facility 'local8'"),
        ({"facility": 24}, "less than or equal to 23"),
        ({"app_name": "my app"}, "printable ASCII"),
        ({"app_name": "x" * 49}, "1 to 48"),
        ({"hostname": "h\u00e9"}, "printable ASCII"),
        ({"buffer": 0}, "greater than or equal to 1"),
        ({"address": "127.0.0.1:99999"}, "bad port"),
        ({"address": ":514"}, "no host before the port"),
        ({"address": "a b:514"}, "not a host name"),
        ({"tls": {"ca": "ca.pem"}}, "only used with transport: tls"),
    ],
)
def test_syslog_errors(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SyslogConfig.model_validate({"address": "127.0.0.1:514", "transport": "udp", **extra})


def test_syslog_tls() -> None:
    cfg = SyslogConfig.model_validate(
        {"address": "logs.example:6514", "transport": "tls", "tls": {"ca": "ca.pem", "cert": "c.pem"}}
    )
    assert cfg.tls is not None and cfg.tls.key is None
    with pytest.raises(ValidationError, match="tls.key is set without tls.cert"):
        SyslogTlsConfig.model_validate({"key": "k.pem"})
