"""Rule file faults through a real proxy: the file replaced by a broken one (YAML syntax, bytes that are
not UTF-8), by a folder, by a symbolic link to nothing, by a FIFO, or deleted when the config names
it. The old policy stays in force in every worker (the deny rule still denies, nothing reaches the
upstream), `rules.reload_failed` says which file and why and is counted, and fixing the file reloads.
(tests/proxy/e2e/test_lifecycle.py already covers a file with invalid rules, fixed, and SIGHUP.)

As root, chmod cannot make a file unreadable; a folder, a dangling link or a FIFO under the name is
what "cannot be read" looks like here. Deleting one file of a rules folder is how rules are removed,
so it reloads without that file's rules (README, Hot reload); deleting a file the config names, or the
whole folder, is a failed reload."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from tests.faults.faults_support import audit, metric, send, upstream_paths
from tests.harness import PortcullisProc, assert_denied, base_config

OLD = [{"name": "no-blocked", "action": "deny", "hosts": ["blocked.test"]},
       {"name": "open", "action": "allow", "hosts": ["public.test"]}]
NEW = [*OLD, {"name": "no-www", "action": "deny", "hosts": ["www.public.test"]}]


def _break(path: Path, fault: str) -> None:
    if fault == "syntax":
        path.write_text("rules: [\n  - name: half\n")
    elif fault == "not-utf8":
        path.write_bytes(b"rules:\n  - name: \xff\xfe\x00garbage\n")
    elif fault == "folder":
        path.unlink()
        path.mkdir()
    elif fault == "dangling-link":
        path.unlink()
        path.symlink_to(path.parent / "nowhere.yaml")
    elif fault == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif fault == "deleted":
        path.unlink()
    else:
        raise AssertionError(fault)


def _fix(p: PortcullisProc, fault: str) -> None:
    if fault == "folder":
        shutil.rmtree(p.rules_path)
    p.write_rules(NEW)  # atomically (a temp file renamed over the link, the FIFO, ...)


def _why(fault: str) -> str:
    return {"syntax": r"main\.yaml:\d+:\d+: ", "not-utf8": "main.yaml: cannot read: 'utf-8' codec",
            "folder": "(main.yaml: cannot read: a folder|'rules/main.yaml' is a folder, not a rule file)",
            "dangling-link": "(main.yaml: cannot read: a symbolic link to nothing|no such file or folder)",
            "fifo": "(main.yaml: cannot read: not a regular file|no such file or folder)",
            "deleted": "'rules/main.yaml': no such file or folder"}[fault]


CASES = [("folder", f) for f in ("syntax", "not-utf8", "folder", "dangling-link", "fifo")] + [
    ("explicit", f) for f in ("deleted", "folder", "dangling-link", "fifo")]


@pytest.mark.parametrize(("layout", "fault"), CASES)
def test_a_broken_rule_file_keeps_the_old_policy_and_fixing_it_reloads(tmp_path, upstreams, layout, fault):
    # default_action allow: had the broken file's rules been dropped, blocked.test would be let through.
    cfg = base_config(upstreams, tmp_path, default_action="allow",
                      rules=["rules/"] if layout == "folder" else ["rules/main.yaml"])
    sent = 0
    with PortcullisProc(tmp_path, upstreams, rules=OLD, config=cfg) as p:

        def judged(host: str, path: str) -> int:
            nonlocal sent
            sent += 1
            r = send(p, upstreams, host, path)
            if r.status == 403:
                assert_denied(r, "rule")
            return r.status

        assert judged("blocked.test", "/before") == 403
        _break(p.rules_path, fault)
        failed = p.wait_event("rules.reload_failed", timeout=15)
        assert any(re.search(_why(fault), e) for e in failed["errors"]), failed["errors"]
        assert failed["trigger"] == "watch"
        # The old policy, whole: the deny rule denies, the rest is as before.
        assert judged("blocked.test", "/during") == 403
        assert judged("www.public.test", "/during") == 200
        assert p.decisions(**{"request.path": "/during", "destination.host": "blocked.test"})[0]["rule"] == (
            "no-blocked")
        assert metric(p, "portcullis_rule_reloads_total", result="failure") >= 1
        assert metric(p, "portcullis_rules_loaded") == 2
        assert p.proc is not None
        p.proc.send_signal(signal.SIGHUP)  # a reload asked for by hand fails the same way
        p.wait_event("rules.reload_failed", trigger="sighup", timeout=15)
        assert p.find("rules.reloaded") == []
        _fix(p, fault)
        assert p.wait_event("rules.reloaded", rule_count=3, timeout=15)["trigger"] == "watch"
        assert judged("www.public.test", "/after") == 403  # the new policy is in force
        assert judged("blocked.test", "/after") == 403
    assert p.exit_code == 0
    assert "/during" in upstream_paths(upstreams)
    assert [r for r in upstreams.seen() if str(r["host"]).startswith("blocked.test")] == []
    audit(p, sent=sent)


def test_every_worker_keeps_the_old_policy(tmp_path, upstreams):
    cfg = base_config(upstreams, tmp_path, default_action="allow")
    with PortcullisProc(tmp_path, upstreams, rules=OLD, config=cfg, workers=2) as p:
        _break(p.rules_path, "dangling-link")
        p.wait_event("rules.reload_failed", count=2, timeout=20)  # one per worker
        assert {e.get("worker") for e in p.find("rules.reload_failed")} == {0, 1}
        for i in range(8):  # spread over both workers by the kernel: every one still denies
            assert_denied(send(p, upstreams, "blocked.test", f"/w{i}"), "rule")
        _fix(p, "dangling-link")
        p.wait_event("rules.reloaded", count=2, rule_count=3, timeout=20)
        for i in range(4):
            assert_denied(send(p, upstreams, "www.public.test", f"/n{i}"), "rule")
    assert upstream_paths(upstreams) == []
    audit(p, sent=12)


def test_deleting_a_file_of_a_rules_folder_removes_its_rules(tmp_path, upstreams):
    """Documented: that is how rules are removed (the reload says which files it loaded)."""
    with PortcullisProc(tmp_path, upstreams, rules=OLD,
                        extra_rule_files={"extra.yaml": json.dumps({"rules": NEW[2:]})}) as p:
        assert_denied(send(p, upstreams, "www.public.test", "/before"), "rule")
        (tmp_path / "rules" / "extra.yaml").unlink()
        ev = p.wait_event("rules.reloaded", rule_count=2, timeout=15)
        assert [Path(f).name for f in ev["files"]] == ["main.yaml"]
        assert_denied(send(p, upstreams, "www.public.test", "/after"), "default")
    audit(p, sent=2)
