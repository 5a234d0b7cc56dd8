"""addons/approvals/persist.py: the `always` rule persister and its atomic writer, on real files."""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from addons.approvals import persist
from addons.approvals.errors import ApprovalError
from addons.approvals.model import Approval, Choice, DecideError
from addons.approvals.persist import Persister
from addons.config.models import RuleFile
from tests.approvals.approvals_support import request


def add(path: Path, name: str, host: str = "h.example", **kw) -> None:
    args = {"action": Choice.ALLOW, "port": 443, "clients": None, "by": "me", "reason": "why",
            "now": 0.0} | kw
    persist.append_rule(path, name=name, host=host, **args)


def rules(path: Path) -> list:
    return RuleFile.model_validate(YAML(typ="safe").load(path.read_text())).rules


def test_creates_the_file_and_appends_with_comments(tmp_path):
    p = tmp_path / "rules" / "approved.yaml"
    add(p, "r1", by="ann", reason="ci needs it")
    add(p, "r2", host="two.example", action=Choice.DENY, clients=["ci"])
    assert [(r.name, r.action, r.hosts, r.clients) for r in rules(p)] == [
        ("r1", "allow", ["h.example"], None), ("r2", "deny", ["two.example"], ["ci"])]
    text = p.read_text()
    assert "# approved by ann at 1970-01-01T00:00:00Z: ci needs it" in text
    assert "# denied by me at" in text
    assert [f for f in os.listdir(p.parent) if f != "approved.yaml"] == []  # no temp or lock files left


def test_existing_content_and_comments_are_kept_byte_for_byte(tmp_path):
    p = tmp_path / "approved.yaml"
    original = ("# hand-written header\nrules:\n- name: mine   # keep me\n  action: allow\n"
                "  hosts: [m.example]\n")
    p.write_text(original)
    add(p, "r1")
    assert p.read_text().startswith(original)
    assert [r.name for r in rules(p)] == ["mine", "r1"]


@pytest.mark.parametrize("text", ["rules: []\n", "rules:\n", "# only a comment\n", "",
                                  "rules: [{name: a, action: allow, hosts: [a.example]}]\n"])
def test_other_shapes_are_appended_to_correctly(tmp_path, text):
    p = tmp_path / "approved.yaml"
    p.write_text(text)
    before = [r.name for r in rules(p)] if "name" in text else []
    add(p, "new")
    assert [r.name for r in rules(p)] == [*before, "new"]


@pytest.mark.parametrize("text", ["rules: [\n", "- a\n- b\n", "rules: 5\n", "rules:\n  - a: 1\n bad\n"])
def test_refuses_to_rewrite_a_broken_file(tmp_path, text):
    p = tmp_path / "approved.yaml"
    p.write_text(text)
    with pytest.raises(ApprovalError):
        add(p, "new")
    assert p.read_text() == text


def test_a_manual_edit_during_the_write_is_not_lost(tmp_path, monkeypatch):
    """Someone saves the file between our read and our rename: we start over from their text."""
    p = tmp_path / "approved.yaml"
    p.write_text("rules:\n  - name: old\n    action: allow\n    hosts: [o.example]\n")
    real_commit = persist._commit
    calls = {"n": 0}

    def commit_with_a_concurrent_edit(path, before, text):
        calls["n"] += 1
        if calls["n"] == 1:
            path.write_text(path.read_text() + "  - name: manual\n    action: deny\n    hosts: [m.example]\n")
        return real_commit(path, before, text)

    monkeypatch.setattr(persist, "_commit", commit_with_a_concurrent_edit)
    add(p, "approved-1")
    assert calls["n"] == 2
    assert [r.name for r in rules(p)] == ["old", "manual", "approved-1"]


def test_concurrent_writers_all_land(tmp_path):
    p = tmp_path / "approved.yaml"
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            add(p, f"r{i}", host=f"h{i}.example")
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(r.name for r in rules(p)) == sorted(f"r{i}" for i in range(20))


def test_file_mode_is_kept(tmp_path):
    p = tmp_path / "approved.yaml"
    p.write_text("rules: []\n")
    p.chmod(0o640)
    add(p, "r")
    assert p.stat().st_mode & 0o777 == 0o640


def test_rule_names_are_safe_and_unique_per_approval():
    assert persist.rule_name(Choice.ALLOW, "Bücher.example", 443, "apr_0123456789ab") == \
        "approved-b-cher.example-443-01234567"
    assert persist.rule_name(Choice.DENY, "::1", 80, "apr_ffff0000aaaa").startswith("denied-1-80-")
    assert persist.rule_name("deny", "::1", 80, "apr_ffff0000aaaa").startswith("denied-1-80-")  # plain too


def test_a_plain_action_string_is_read_as_the_choice_and_anything_else_refused(tmp_path):
    p = tmp_path / "approved.yaml"
    add(p, "plain-allow", action="allow")
    add(p, "plain-deny", host="d.example", action="deny")
    assert [(r.name, r.action) for r in rules(p)] == [("plain-allow", "allow"), ("plain-deny", "deny")]
    before = p.read_text()
    with pytest.raises(ValueError):
        add(p, "bogus", action="approval")  # never written as a deny (or anything else)
    assert p.read_text() == before


def test_a_reader_never_sees_a_partial_file(tmp_path):
    """What the hot reload relies on: every read during 20 appends parses and has whole rules."""
    p = tmp_path / "approved.yaml"
    p.write_text("rules: []\n")
    stop = threading.Event()
    seen: list[int] = []
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            text = p.read_text()
            try:
                seen.append(len(RuleFile.model_validate(YAML(typ="safe").load(text)).rules))
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                bad.append(f"{e}: {text!r}")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(20):
            add(p, f"r{i}", host=f"h{i}.example")
    finally:
        stop.set()
        t.join(10)
    assert bad == [] and len(seen) > 0
    assert seen == sorted(seen)  # rules only ever appear, whole and in order
    assert len(rules(p)) == 20


@pytest.mark.parametrize("text", [
    "rules:\n    -   name: a\n        action: allow\n        hosts: [a.example]\n",
    "rules:\n- name: a\n  action: allow\n  hosts: [a.example]\n  description: |\n    two\n    lines\n",
    "rules:\n  - name: a\n    action: allow\n    hosts:\n      - a.example\n# trailing comment",
    "rules:\r\n- name: a\r\n  action: allow\r\n  hosts: [a.example]\r\n",
])
def test_unusual_layouts_still_append_exactly_one_rule(tmp_path, text):
    p = tmp_path / "approved.yaml"
    p.write_bytes(text.encode())
    add(p, "new")
    assert [r.name for r in rules(p)] == ["a", "new"]


# The persister the service calls for `always`

def pending(client_name: str | None = "ci") -> Approval:
    return Approval.opened("apr_0123456789abcdef", request(host="api.example", port=8443,
                                                           client_name=client_name), now=0.0, timeout=60.0)


async def test_the_persister_writes_the_rule_for_the_approvals_client_group(tmp_path):
    path = tmp_path / "rules" / "approved.yaml"
    await Persister(path).write(pending(), Choice.ALLOW, "ann", "needed", now=0.0)
    [rule] = rules(path)
    assert (rule.name, rule.action, rule.hosts, rule.ports, rule.clients) == (
        "approved-api.example-8443-01234567", "allow", ["api.example"], [8443], ["ci"])
    assert "# approved by ann at 1970-01-01T00:00:00Z: needed" in path.read_text()
    await Persister(path).write(replace(pending(None), id="apr_ffffffff00"), Choice.DENY, None, None, now=0.0)
    second = rules(path)[1]
    assert (second.name, second.action, second.clients) == ("denied-api.example-8443-ffffffff", "deny", None)


async def test_without_persist_to_always_is_422_and_nothing_is_written(tmp_path):
    with pytest.raises(DecideError) as e:
        await Persister(None).write(pending(), Choice.ALLOW, None, None, now=0.0)
    assert (e.value.status, e.value.code) == (422, "no_persist_to")
    assert "use once or session" in e.value.message
    assert e.value.approval == pending() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("broken", ["rules: [\n", None])
async def test_a_rule_that_cannot_be_written_is_500_and_the_file_is_kept(tmp_path, broken):
    path = tmp_path / "approved.yaml"
    if broken is None:  # not a file at all: a folder where the file should be
        path.mkdir()
    else:
        path.write_text(broken)
    with pytest.raises(DecideError) as e:
        await Persister(path).write(pending(), Choice.ALLOW, None, None, now=0.0)
    assert (e.value.status, e.value.code) == (500, "persist_failed")
    assert "nothing was decided" in e.value.message
    assert path.is_dir() if broken is None else path.read_text() == broken
