"""`portcullis report` on a recorded events file: groups, suggested rules (valid rule YAML), formats."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from addons.cli import main
from addons.config.models import RuleFile
from addons.telemetry.report import build, parse_since

EVENTS = Path(__file__).parent.parent / "data" / "telemetry" / "events.jsonl"


def _json(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    assert main(["report", str(EVENTS), "--format", "json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_groups_by_registrable_domain_with_counts_clients_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    rep = _json(capsys)
    assert rep["summary"]["skipped_not_json"] == 1 and rep["summary"]["skipped_other_schema"] == 1
    assert rep["summary"]["not_policy_denials"] == {"bad_request": 1}
    cands = {g["domain"]: g for g in rep["candidates"]}
    assert list(cands) == ["openai.com", "jsdelivr.net", "github.com", "example.io"]  # most first
    oa = cands["openai.com"]
    assert (oa["denied"], oa["held"], oa["reasons"], oa["ports"]) == (4, 0, {"default": 4}, [443])
    assert oa["clients"] == {"ci-agents": 4}
    assert oa["first_seen"] < oa["last_seen"]
    gh = cands["github.com"]
    assert (gh["denied"], gh["held"]) == (1, 1)
    assert gh["reasons"] == {"approval_requested": 1, "approval_timeout": 1}
    assert cands["example.io"]["clients"] == {"10.0.2.9": 1}  # no client name: the address
    assert [g["domain"] for g in rep["denied_by_deny_rules"]] == ["pastebin.com"]
    sus = {g["domain"]: g["reasons"] for g in rep["do_not_allowlist"]}
    assert sus["169.254.169.254"] == {"private_address": 1}
    assert sus["google.internal"] == {"private_address": 1}
    assert sus["github.com"] == {"sni_mismatch": 1}
    assert any("odd host" in next(iter(r)) for r in sus.values())  # the CR/LF host is never a candidate


def _rules(yaml_text: str) -> list[dict[str, Any]]:
    rules = YAML(typ="safe").load(yaml_text)
    RuleFile.model_validate({"rules": rules})  # pasteable into a rule file as is
    return rules


def test_suggested_rules_are_valid_rule_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    cands = {g["domain"]: g for g in _json(capsys)["candidates"]}
    (oa,) = _rules(cands["openai.com"]["rule_yaml"])
    assert oa == {"name": "allow-openai-com", "action": "allow", "hosts": ["api.openai.com"]}
    (js,) = _rules(cands["jsdelivr.net"]["rule_yaml"])
    assert js["hosts"] == ["**.jsdelivr.net"]  # three subdomains seen
    assert "3 names seen" in cands["jsdelivr.net"]["rule_yaml"]
    (ex,) = _rules(cands["example.io"]["rule_yaml"])
    assert ex["ports"] == [8443] and ex["hosts"] == ["registry.example.io"]
    all_rules = _rules("\n".join(g["rule_yaml"] for g in cands.values()))
    assert len({r["name"] for r in all_rules}) == len(all_rules) == 4


def test_since_relative_and_absolute(capsys: pytest.CaptureFixture[str]) -> None:
    rep = _json(capsys, "--since", "2026-11-20T10:00:00Z")
    assert {g["domain"] for g in rep["candidates"]} == {"github.com"}
    assert rep["summary"]["skipped_before_since"] > 0
    rep = _json(capsys, "--since", "1h")  # the recording is older than an hour
    assert rep["candidates"] == [] and rep["do_not_allowlist"] == []
    now = datetime(2026, 11, 20, 11, 0, tzinfo=UTC)
    assert parse_since("30m", now) == datetime(2026, 11, 20, 10, 30, tzinfo=UTC)
    assert parse_since("2d", now).day == 18
    with pytest.raises(ValueError):
        parse_since("yesterday")


def test_markdown_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(EVENTS), "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    assert "| openai.com | 4 | 0 |" in md and "```yaml" in md and "## Do not allowlist" in md
    assert "\r" not in md and "\\x0d\\x0a" in md  # the hostile host shown escaped
    assert main(["report", str(EVENTS), "--format", "table"]) == 0
    table = capsys.readouterr().out
    assert "allow-openai-com" in table and "Do not allowlist" in table and "\r" not in table
    assert main(["report", str(EVENTS)]) == 0  # auto: not a TTY here -> markdown
    assert capsys.readouterr().out.startswith("# Portcullis report")


def test_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["report", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert main(["report", str(EVENTS), "--since", "soon"]) == 2
    assert "--since" in capsys.readouterr().err


def test_empty_and_garbage_input() -> None:
    rep = build(io.StringIO('\n\x00\x01garbage\n[1,2]\n{"schema": "portcullis.event/v1"}\n'))
    assert (
        rep.groups == {} and rep.skipped_not_json == 1 and rep.skipped_other_schema == 1 and rep.events == 1
    )


def _decision(host: str, rd: str | None, n: int) -> str:
    return json.dumps({
        "schema": "portcullis.event/v1", "timestamp": f"2026-11-20T10:{n:02d}:00.000Z",
        "event": "egress.decision", "decision": "deny", "reason": "default", "rule": None,
        "client": {"address": "10.0.1.5", "name": None},
        "destination": {"host": host, "port": 443, "ip": None, "registered_domain": rd},
    })


def test_names_under_unlisted_suffixes_group_by_their_registrable_domain() -> None:
    # Older events carry registered_domain null for such names; newer ones carry it: both group alike.
    events = [_decision("api.build.corp", None, 1), _decision("ci.build.corp", None, 2),
              _decision("cache.build.corp", "build.corp", 3), _decision("x.corp.internal", None, 4),
              _decision("y.corp.internal", "corp.internal", 5), _decision("foo.test", None, 6),
              _decision("10.9.8.7", None, 7), _decision("intranet", None, 8)]
    rep = build(events).as_dict()
    cands = {g["domain"]: g for g in rep["candidates"]}
    assert set(cands) == {"build.corp", "corp.internal", "foo.test", "10.9.8.7", "intranet"}
    assert cands["build.corp"]["hosts"] == {"api.build.corp": 1, "ci.build.corp": 1, "cache.build.corp": 1}
    assert '"**.build.corp"' in cands["build.corp"]["rule_yaml"]   # three names: one wildcard rule
    assert cands["corp.internal"]["denied"] == 2


def _ev(event: str, **f: Any) -> str:
    envelope = {"schema": "portcullis.event/v1", "timestamp": "2026-12-01T10:00:00.000Z", "event": event}
    return json.dumps({**envelope, **f})


def test_credentials_applied_refused_and_never_used(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join([
        _ev("proxy.started", credential_names=["gh", "pypi", "unused"]),
        _ev("egress.decision", decision="allow", reason="rule", credential="gh"),
        _ev("egress.decision", decision="allow", reason="rule", credential="gh"),
        _ev("egress.decision", decision="deny", reason="credential_leak", credential="pypi",
            destination={"host": "paste.example"}),
        _ev("rules.reloaded", credential_names=["gh", "pypi", "unused", "added"]),
    ]) + "\n")
    rep = build(events.read_text().splitlines(), credentials=["from-config"])
    assert rep.as_dict()["credentials"] == {
        "declared": ["added", "from-config", "gh", "pypi", "unused"], "applied": {"gh": 2},
        "refused": {"pypi": 1}, "never_used": ["added", "from-config", "pypi", "unused"]}
    assert main(["report", str(events), "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    assert "## Credentials" in md and "| gh | 2 | 0 |" in md and "Never used" in md and "unused" in md
    assert main(["report", str(events), "--format", "table"]) == 0
    assert "Never used: added, pypi, unused" in capsys.readouterr().out
    cfg = tmp_path / "c.yaml"
    cred = {"name": "cfg-cred", "secret": {"env": "NOPE"}, "hosts": ["api.github.com"],
            "apply": {"header": "X-Key"}}
    (tmp_path / "r.yaml").write_text(json.dumps({"credentials": [cred]}))
    cfg.write_text('rules: ["r.yaml"]\napprovals: {persist_to: null}\n')
    assert main(["report", str(events), "--format", "json", "--config", str(cfg)]) == 0
    assert "cfg-cred" in json.loads(capsys.readouterr().out)["credentials"]["never_used"]
