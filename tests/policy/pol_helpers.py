"""Helpers for the policy tests: build a real config + rule files in a temp dir and load them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from addons.config.load import PolicyError, load_config
from addons.policy.evaluate import Policy
from addons.policy.hosts import HostError, normalize_host
from addons.policy.model import Client, Decision, Layer, Request

REPO = Path(__file__).resolve().parent.parent.parent


def write_config(tmp: Path, rules: list[dict[str, Any]] | str, **config: Any) -> Path:
    """A config file (JSON is YAML) with `rules/r.yaml` holding `rules` (dicts or raw YAML text)."""
    (tmp / "rules").mkdir(exist_ok=True)
    text = rules if isinstance(rules, str) else json.dumps({"rules": rules}, indent=1)
    (tmp / "rules" / "r.yaml").write_text(text, encoding="utf-8")
    cfg: dict[str, Any] = {"rules": ["rules/"], "default_action": "deny", "approvals": {"persist_to": None}}
    cfg.update(config)
    path = tmp / "portcullis.yaml"
    path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return path


def make_policy(tmp: Path, rules: list[dict[str, Any]] | str, **config: Any) -> Policy:
    return load_config(write_config(tmp, rules, **config)).policy


def load_errors(config_path: Path) -> list[str]:
    try:
        load_config(config_path)
    except PolicyError as e:
        return e.errors
    raise AssertionError("expected the config to be rejected")


def _host(host: str) -> str:
    try:
        return normalize_host(host)
    except HostError:
        return host  # the pipeline refuses such hosts before the policy; kept raw here


def q(
    host: str,
    port: int = 443,
    method: str | None = "GET",
    path: str | None = "/",
    client_address: str | None = None,
    client_user: str | None = None,
    scheme: str | None = None,
) -> Request:
    """A request as the pipeline hands it to the policy (host normalised)."""
    return Request(
        _host(host), port, Client(client_address, None, client_user), scheme, method, path, Layer.HTTP
    )


def tunnel(
    host: str, port: int = 443, client_address: str | None = None, client_user: str | None = None, **kw: Any
) -> Request:
    """A CONNECT as the pipeline hands it to the policy (decided on its authority)."""
    return Request(
        _host(host), port, Client(client_address, None, client_user), None, "CONNECT", None, Layer.CONNECT
    )


def summary(d: Decision) -> tuple[str, str, str | None]:
    return d.action.value, d.reason.value, d.rule.name if d.rule else None
