"""The atomic `always` writer and the SQLite store, on real files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from addons.approvals import persist
from addons.approvals.errors import ApprovalError
from addons.approvals.store import Approval, SqliteStore, store_path
from addons.config.models import RuleFile


def add(path: Path, name: str, host: str = "h.example", **kw) -> None:
    args = {"action": "allow", "port": 443, "clients": None, "by": "me", "reason": "why", "now": 0.0} | kw
    persist.append_rule(path, name=name, host=host, **args)


def rules(path: Path) -> list:
    return RuleFile.model_validate(YAML(typ="safe").load(path.read_text())).rules


def test_creates_the_file_and_appends_with_comments(tmp_path):
    p = tmp_path / "rules" / "approved.yaml"
    add(p, "r1", by="ann", reason="ci needs it")
    add(p, "r2", host="two.example", action="deny", clients=["ci"])
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
    assert persist.rule_name("allow", "Bücher.example", 443, "apr_0123456789ab") == \
        "approved-b-cher.example-443-01234567"
    assert persist.rule_name("deny", "::1", 80, "apr_ffff0000aaaa").startswith("denied-1-80-")


# The store


def approval(i: str = "apr_1", **kw) -> Approval:
    base = {"id": i, "client_key": "c", "client_address": "10.0.0.1", "client_name": None, "host": "h",
            "port": 443, "scheme": "https", "method": None, "path": None, "rule": None, "created_at": 100.0,
            "expires_at": 200.0} | kw
    return Approval(**base)


def test_store_url_forms(tmp_path):
    assert store_path("sqlite:///state/p.db", tmp_path) == tmp_path / "state/p.db"
    assert store_path("sqlite:////var/lib/p.db", tmp_path) == Path("/var/lib/p.db")
    for bad in ("redis://localhost:6379/0", "sqlite://", "postgres://x", "state.db"):
        with pytest.raises(ApprovalError, match="not supported"):
            store_path(bad, tmp_path)


def test_store_state_machine_is_compare_and_set(tmp_path):
    s = SqliteStore(tmp_path / "s" / "a.db")
    s.insert(approval())
    assert s.pending_for("c", "h", 443, now=150).id == "apr_1"
    assert s.pending_for("c", "h", 443, now=250) is None
    assert s.decide("apr_1", "allow", "once", "x", None, now=150)
    assert not s.decide("apr_1", "deny", "once", "y", None, now=151)  # first decision wins
    assert not s.expire("apr_1", now=300)
    assert s.get("apr_1").state == "allowed" and s.get("apr_1").decided_by == "x"
    s.insert(approval("apr_2"))
    assert [a.id for a in s.due(now=250)] == ["apr_2"]
    assert s.expire("apr_2", now=250) and not s.decide("apr_2", "allow", "once", None, None, now=251)
    assert [a.id for a in s.recent()] == ["apr_2", "apr_1"]
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()


def test_grants_deny_first_single_use_consumed_expired_swept(tmp_path):
    s = SqliteStore(tmp_path / "a.db")
    s.add_grant("c", "h", 443, "allow", "session", "apr_1", now=0, expires_at=100, single_use=False)
    assert s.take_grant("c", "h", 443, now=50).decision == "allow"
    assert s.take_grant("c", "h", 443, now=50).decision == "allow"  # session: not consumed
    s.add_grant("c", "h", 443, "deny", "session", "apr_2", now=1, expires_at=100, single_use=False)
    assert s.take_grant("c", "h", 443, now=50).decision == "deny"  # deny wins
    s.add_grant("c", "o", 80, "allow", "once", "apr_3", now=0, expires_at=100, single_use=True)
    assert s.take_grant("c", "o", 80, now=50).scope == "once"
    assert s.take_grant("c", "o", 80, now=50) is None  # used up
    assert s.take_grant("c", "h", 443, now=150) is None  # expired
    assert s.take_grant("other", "h", 443, now=50) is None
    assert s.sweep(now=150) == 2
    assert s.grants(now=0) == []


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
