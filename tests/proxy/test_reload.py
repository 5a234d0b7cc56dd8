"""addons/proxy/reload.py: the policy in force is swapped whole on a valid reload; a broken one (or a loader
bug) keeps it and says why; the watcher reloads when a rule file changes (real watchfiles, bounded)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from addons.config.load import load_config
from addons.proxy import reload as reload_module
from addons.proxy.reload import PolicyHolder
from tests.policy.pol_helpers import q, summary, write_config
from tests.telemetry.tel_helpers import lines, make


def holder(tmp_path: Path, rules: list[dict[str, Any]] | None = None) -> tuple[PolicyHolder, Any, Any]:
    cfg = write_config(
        tmp_path, rules if rules is not None else [{"name": "a", "action": "allow", "hosts": ["a.test"]}]
    )
    tel, out = make()
    return PolicyHolder(load_config(cfg), tel), tel, out


def gauge(tel: Any, name: str, labels: dict[str, str] | None = None) -> float | None:
    return tel.metrics.registry.get_sample_value(name, labels or {})


def test_the_loaded_policy_is_in_force_and_counted(tmp_path: Path) -> None:
    h, tel, _ = holder(tmp_path)
    assert summary(h.policy.decide(q("a.test"))) == ("allow", "rule", "a")
    assert gauge(tel, "portcullis_rules_loaded") == 1


async def test_a_valid_reload_swaps_the_whole_policy(tmp_path: Path) -> None:
    h, tel, out = holder(tmp_path)
    old = h.policy
    (tmp_path / "rules" / "r.yaml").write_text(
        "rules:\n  - {name: b, action: deny, hosts: [a.test]}\n"
        "  - {name: c, action: allow, hosts: [c.test]}\n"
    )
    assert await h.reload("sighup") is True
    assert h.policy is not old and summary(h.policy.decide(q("a.test"))) == ("deny", "rule", "b")
    assert summary(old.decide(q("a.test"))) == ("allow", "rule", "a")  # a decision in flight keeps its policy
    (ev,) = lines(out)
    assert (ev["event"], ev["rule_count"], ev["trigger"]) == ("rules.reloaded", 2, "sighup")
    assert ev["files"] == [str(tmp_path / "rules" / "r.yaml")]
    assert gauge(tel, "portcullis_rules_loaded") == 2
    assert gauge(tel, "portcullis_rule_reloads_total", {"result": "success"}) == 1


async def test_a_broken_reload_keeps_the_policy_in_force(tmp_path: Path) -> None:
    h, tel, out = holder(tmp_path)
    old = h.policy
    (tmp_path / "rules" / "r.yaml").write_text("rules:\n  - {name: b, action: allow, hosts: ['*.com']}\n")
    assert await h.reload("watch") is False
    assert h.policy is old
    (ev,) = lines(out)
    assert ev["event"] == "rules.reload_failed" and ev["trigger"] == "watch"
    assert ev["errors"][0].startswith(f"{tmp_path / 'rules' / 'r.yaml'}:2:38: rule 'b': wildcard '*.com'")
    assert gauge(tel, "portcullis_rule_reloads_total", {"result": "failure"}) == 1
    assert gauge(tel, "portcullis_rules_loaded") == 1


async def test_a_loader_bug_keeps_the_policy_and_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, _, out = holder(tmp_path)
    old = h.policy

    def broken(*a: Any, **k: Any) -> None:
        raise RuntimeError("loader bug")

    monkeypatch.setattr(reload_module, "load_policy", broken)
    assert await h.reload("sighup") is False and h.policy is old
    (ev,) = lines(out)
    assert ev["event"] == "rules.reload_failed"
    assert ev["errors"] == [f"{tmp_path / 'portcullis.yaml'}:1:1: reload failed: loader bug"]


async def test_reloads_do_not_interleave(tmp_path: Path) -> None:
    h, _, out = holder(tmp_path)
    results = await asyncio.gather(*(h.reload(f"t{i}") for i in range(5)))
    assert results == [True] * 5
    assert [e["trigger"] for e in lines(out)] == [f"t{i}" for i in range(5)]


def test_the_watched_folders_include_every_rule_files_folder(tmp_path: Path) -> None:
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "x.yaml").write_text("rules: []\n")
    (tmp_path / "later").mkdir()
    cfg = write_config(tmp_path, [])
    cfg.write_text('{"rules": ["rules/", "more/x.yaml"], "approvals": {"persist_to": null}}')
    loaded = load_config(cfg)
    # A rule file not written yet (e.g. the approvals' persist_to): its folder is watched, so its
    # creation is seen; one whose folder does not exist either is not.
    extra = ["later/approved.yaml", "nowhere/y.yaml"]
    loaded = dataclasses.replace(
        loaded, config=loaded.config.model_copy(update={"rules": [*loaded.config.rules, *extra]})
    )
    h = PolicyHolder(loaded, make()[0])
    assert h.watch_paths() == sorted((tmp_path / d).resolve() for d in ("later", "more", "rules"))


async def test_the_watcher_reloads_when_a_rule_file_changes(tmp_path: Path) -> None:
    h, _, out = holder(tmp_path)
    task = asyncio.get_running_loop().create_task(h.watch())
    try:
        rule_file = tmp_path / "rules" / "r.yaml"
        for attempt in range(50):  # bounded: the watcher must be running before the change counts
            rule_file.write_text(f"rules:\n  - {{name: w{attempt}, action: allow, hosts: [w.test]}}\n")
            for _ in range(20):
                await asyncio.sleep(0.05)
                if any(e["event"] == "rules.reloaded" for e in lines(out)):
                    break
            else:
                continue
            break
        reloaded = [e for e in lines(out) if e["event"] == "rules.reloaded"]
        assert reloaded and reloaded[0]["trigger"] == "watch"
        assert h.policy.decide(q("w.test")).rule is not None
    finally:
        h.stop()
        await asyncio.wait_for(task, 10)
    assert task.done() and task.exception() is None


async def test_a_watcher_with_nothing_to_watch_ends_at_once(tmp_path: Path) -> None:
    h, _, _ = holder(tmp_path)
    h.watch_paths = list  # type: ignore[method-assign]
    await asyncio.wait_for(h.watch(), 5)


def _with_secret_file(tmp_path: Path, folder: str = "secrets") -> tuple[PolicyHolder, Any, Path]:
    secret = tmp_path / folder / "gh"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("ghp_first_value_0001\n")
    rules = ("{\"rules\": [], \"credentials\": [{\"name\": \"gh\", \"secret\": {\"file\": \"" + folder
             + "/gh\"}, \"hosts\": [\"api.github.com\"], \"apply\": {\"header\": \"Authorization\"}}]}")
    h, _, out = holder(tmp_path, [])
    (tmp_path / "rules" / "r.yaml").write_text(rules)
    h.policy = load_config(tmp_path / "portcullis.yaml").policy
    return h, out, secret


def test_a_secret_files_folder_is_watched_and_only_its_changes_count(tmp_path: Path) -> None:
    h, _, secret = _with_secret_file(tmp_path)
    assert secret.parent.resolve() in h.watch_paths()
    assert h.relevant(str(secret))
    assert h.relevant(str(secret.parent / "..data"))  # a Kubernetes secret volume swapping its files
    assert not h.relevant(str(secret.parent / "other"))
    assert h.relevant(str(tmp_path / "rules" / "x.yml"))


async def test_rotating_a_secret_file_reloads_it(tmp_path: Path) -> None:
    h, out, secret = _with_secret_file(tmp_path)
    task = asyncio.get_running_loop().create_task(h.watch())
    try:
        for attempt in range(50):  # bounded: the watcher must be running before the change counts
            secret.write_text(f"ghp_rotated_value_{attempt:04d}\n")
            for _ in range(20):
                await asyncio.sleep(0.05)
                if any(e["event"] == "rules.reloaded" for e in lines(out)):
                    break
            else:
                continue
            break
        (ev,) = [e for e in lines(out) if e["event"] == "rules.reloaded"][:1]
        assert ev["trigger"] == "watch" and ev["credential_names"] == ["gh"]
        assert h.policy.credentials.creds[0].secret.reveal().startswith("ghp_rotated_value_")
        assert "ghp_" not in "".join(out.getvalue())
    finally:
        h.stop()
        await asyncio.wait_for(task, 10)
