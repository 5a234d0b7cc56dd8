"""`portcullis report EVENTS --by task`: one row per task credential, rules scoped to the task's profile."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from addons.cli import main
from addons.config.models import RuleFile

SCHEMA = "portcullis.event/v1"


def _event(
    event: str,
    task: str | None,
    host: str,
    decision: str = "deny",
    reason: str = "default",
    ts: str = "2026-12-01T10:00:00Z",
    profile: str | None = "ci-build",
) -> dict[str, Any]:
    client: dict[str, Any] = {"address": "10.0.2.9"}
    if task is not None:
        client.update(task_id=task, profile=profile, labels={"repo": "acme/api"})
    return {
        "schema": SCHEMA,
        "event": event,
        "timestamp": ts,
        "decision": decision,
        "reason": reason,
        "client": client,
        "destination": {"host": host, "port": 443},
    }


@pytest.fixture
def events(tmp_path: Path) -> Path:
    docs = [
        _event(
            "egress.decision", "t-1", "pypi.org", decision="allow", reason="rule", ts="2026-12-01T10:00:00Z"
        ),
        _event("egress.decision", "t-1", "api.openai.com", ts="2026-12-01T10:01:00Z"),
        _event("egress.decision", "t-1", "api.openai.com", ts="2026-12-01T10:02:00Z"),
        _event(
            "egress.decision", "t-1", "169.254.169.254", reason="private_address", ts="2026-12-01T10:03:00Z"
        ),
        _event("approval.requested", "t-1", "github.com", ts="2026-12-01T10:04:00Z"),
        _event("egress.decision", "t-2", "example.org", decision="allow", reason="rule", profile="docs"),
        _event("egress.decision", None, "pastebin.com", reason="rule"),
    ]
    path = tmp_path / "events.jsonl"
    lines = [json.dumps(d) for d in docs] + ["not json", json.dumps({"schema": "other/v1", "event": "x"})]
    path.write_text("\n".join(lines) + "\n")
    return path


def _json(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, dict[str, Any]]:
    assert main(["report", str(path), "--by", "task", "--format", "json"]) == 0
    return {str(t["task_id"]): t for t in json.loads(capsys.readouterr().out)["tasks"]}


def test_groups_by_task_with_counts_reasons_and_time_span(
    events: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = _json(capsys, events)
    assert list(tasks) == ["t-1", "None", "t-2"]  # most refused or held first; no credential is its own row
    t1 = tasks["t-1"]
    assert (t1["allowed"], t1["denied"], t1["held"]) == (1, 3, 1)
    assert t1["reasons"] == {"default": 2, "private_address": 1}
    assert t1["profiles"] == {"ci-build": 5} and t1["labels"] == {"repo": "acme/api"}
    assert (t1["first_seen"], t1["last_seen"]) == ("2026-12-01T10:00:00Z", "2026-12-01T10:04:00Z")
    assert t1["refused_hosts"] == {"api.openai.com": 2}  # the metadata address is never a candidate
    assert tasks["t-2"]["denied"] == 0 and tasks["t-2"]["rule_yaml"] is None


def test_rule_is_scoped_to_the_tasks_profile_and_valid(
    events: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = _json(capsys, events)
    rules = YAML(typ="safe").load(tasks["t-1"]["rule_yaml"])
    RuleFile.model_validate({"rules": rules})
    assert rules == [
        {
            "name": "ci-build-from-t-1",
            "action": "allow",
            "hosts": ["api.openai.com"],
            "profiles": ["ci-build"],
        }
    ]
    assert tasks["None"]["rule_yaml"] is None  # no profile: never a rule for everyone


def test_markdown_escapes_pipes_and_controls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps(_event("egress.decision", "a|b\x1b[31m", "x.example")) + "\n")
    assert main(["report", str(path), "--by", "task", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert "| task | profile |" in out and "a\\|b" in out and "\x1b" not in out


def test_no_decisions_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert main(["report", str(path), "--by", "task", "--format", "markdown"]) == 0
    assert "No decisions" in capsys.readouterr().out


def test_since_filters_old_events(events: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(events), "--by", "task", "--since", "1m", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == []  # all recorded long before "now"
