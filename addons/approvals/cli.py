"""`portcullis approvals list|allow|deny` and `portcullis webhook-verify`."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from addons.approvals.errors import ApprovalError
from addons.approvals.model import Choice, Scope, State
from addons.approvals.webhook import VerifyError, verify

DEFAULT_ADMIN = "http://127.0.0.1:9090"
DEFAULT_TOKEN_ENV = "PORTCULLIS_ADMIN_TOKEN"  # noqa: S105 (a variable name)
DEFAULT_CONFIG = "portcullis.yaml"
# Where `./dev run` keeps the admin token it made, relative to the config file's folder.
TOKEN_FILE = Path("state") / "admin-token"


def approvals_command(args: argparse.Namespace) -> int:
    """List or decide approvals on a running proxy. 0 ok, 1 refused (with the server's message)."""
    try:
        base, token_env, config = _target(args)
        token, source = _token(token_env, config)
    except ApprovalError as e:
        print(f"portcullis approvals: {e}", file=sys.stderr)
        return 1
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=15, trust_env=False) as client:
            if args.action == "list":
                resp = client.get("/approvals")
            else:
                body = {"decision": Choice(args.action).value, "scope": Scope(args.scope).value,
                        "by": args.by or _user(), "reason": args.reason}
                resp = client.post(f"/approvals/{args.id}", json=body)
    except httpx.HTTPError as e:
        print(f"portcullis approvals: cannot reach the admin API at {base}: {e}", file=sys.stderr)
        return 1
    try:
        doc: Any = resp.json()
    except ValueError:
        doc = {"message": resp.text.strip()}
    if resp.status_code != 200:
        msg = doc.get("message") if isinstance(doc, dict) else None
        hint = f" (check the token in {source})" if resp.status_code == 401 else ""
        print(f"portcullis approvals: refused, HTTP {resp.status_code}: {msg or resp.reason_phrase}{hint}",
              file=sys.stderr)
        if args.json:
            print(json.dumps(doc, indent=2))
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
    elif args.action == "list":
        _table(doc.get("approvals", []))
    else:
        print(f"{doc['id']}: {doc['state']} ({doc['scope']}) {doc['host']}:{doc['port']} by {doc['by']}")
    return 0


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


def _target(args: argparse.Namespace) -> tuple[str, str, Path | None]:
    """Admin base URL, token variable and config file: --admin, else the config's admin section
    (--config, else ./portcullis.yaml when it exists), else defaults."""
    listen, token_env = None, DEFAULT_TOKEN_ENV
    config: Path | None = Path(args.config) if args.config else Path(DEFAULT_CONFIG)
    if not args.config and not Path(DEFAULT_CONFIG).is_file():
        config = None
    if config is not None:
        try:
            doc = YAML(typ="safe").load(config.read_text(encoding="utf-8")) or {}
        except (OSError, YAMLError) as e:
            raise ApprovalError(f"cannot read {config}: {e}") from e
        admin = doc.get("admin") if isinstance(doc, dict) else None
        if isinstance(admin, dict):
            listen = admin.get("listen")
            token_env = admin.get("token_env") or token_env
    base = args.admin or (f"http://{listen}" if listen else DEFAULT_ADMIN)
    if "://" not in base:
        base = "http://" + base
    return base.rstrip("/"), str(token_env), config


def _token(token_env: str, config: Path | None) -> tuple[str, str]:
    """The admin token and where it came from: the variable, else `state/admin-token` in the config
    file's folder (what `./dev run` writes). A token file other users can read or write is refused."""
    token = os.environ.get(token_env, "")
    if token or config is None:
        return token, f"${token_env}"
    path = config.parent / TOKEN_FILE
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return "", f"${token_env} (unset; no {path} either)"
    except OSError as e:
        raise ApprovalError(f"cannot read the admin token in {path}: {e.strerror or e}") from e
    with os.fdopen(fd, encoding="utf-8") as fh:
        st = os.fstat(fh.fileno())
        if st.st_mode & 0o077:
            raise ApprovalError(
                f"{path} is open to other users (mode {st.st_mode & 0o777:04o}); the admin token must be "
                f"private: chmod 600 {path}")
        if st.st_uid not in (os.geteuid(), 0):
            raise ApprovalError(f"{path} belongs to another user (uid {st.st_uid}); not using it")
        token = fh.read(4096).strip()
    if not token:
        raise ApprovalError(f"{path} is empty (delete it and run ./dev run again, or set ${token_env})")
    return token, str(path)


def _table(items: list[dict[str, Any]]) -> None:
    if not items:
        print("no approvals")
        return
    now = time.time()
    rows = [("ID", "STATE", "CLIENT", "DESTINATION", "RULE", "LEFT/DECISION")]
    for a in items:
        client = a.get("client_name") or a.get("client") or "-"
        dest = f"{a.get('method') or ''} {a['host']}:{a['port']}{a.get('path') or ''}".strip()
        if a["state"] == State.PENDING.value:
            left = datetime.fromisoformat(a["expires_at"].replace("Z", "+00:00")).timestamp() - now
            tail = f"{max(0, int(left))}s left, {a.get('waiters', 0)} waiting"
        else:
            tail = f"{a.get('decision') or '-'}/{a.get('scope') or '-'} by {a.get('by') or '-'}"
        rows.append((a["id"], a["state"], str(client), dest, a.get("rule") or "(default)", tail))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def webhook_verify_command(args: argparse.Namespace) -> int:
    """Check a received webhook's signature: 0 genuine, 1 not (reason on stderr)."""
    secret = os.environ.get(args.secret_env)
    if not secret:
        print(f"portcullis webhook-verify: {args.secret_env} is not set", file=sys.stderr)
        return 1
    body = sys.stdin.buffer.read() if args.body == "-" else Path(args.body).read_bytes()
    headers = {"webhook-id": args.msg_id, "webhook-timestamp": args.timestamp,
               "webhook-signature": args.signature}
    try:
        # Several whitespace-separated secrets are accepted while a secret is being rotated.
        candidates: list[str | bytes] = list(secret.split())
        verify(candidates, headers, body, tolerance_s=args.tolerance)
    except (VerifyError, ApprovalError) as e:
        print(f"portcullis webhook-verify: invalid: {e}", file=sys.stderr)
        return 1
    print("valid")
    return 0
