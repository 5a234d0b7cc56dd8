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
from addons.approvals.webhook import VerifyError, verify

DEFAULT_ADMIN = "http://127.0.0.1:9090"
DEFAULT_TOKEN_ENV = "PORTCULLIS_ADMIN_TOKEN"  # noqa: S105 (a variable name)


def approvals_command(args: argparse.Namespace) -> int:
    """List or decide approvals on a running proxy. 0 ok, 1 refused (with the server's message)."""
    try:
        base, token_env = _target(args)
    except ApprovalError as e:
        print(f"portcullis approvals: {e}", file=sys.stderr)
        return 1
    token = os.environ.get(token_env, "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=15, trust_env=False) as client:
            if args.action == "list":
                resp = client.get("/approvals")
            else:
                body = {"decision": args.action, "scope": args.scope,
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
        hint = f" (check the token in ${token_env})" if resp.status_code == 401 else ""
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


def _target(args: argparse.Namespace) -> tuple[str, str]:
    """Admin base URL and token variable: --admin, else the config's admin section, else defaults."""
    listen, token_env = None, DEFAULT_TOKEN_ENV
    if args.config:
        try:
            doc = YAML(typ="safe").load(Path(args.config).read_text(encoding="utf-8")) or {}
        except (OSError, YAMLError) as e:
            raise ApprovalError(f"cannot read {args.config}: {e}") from e
        admin = doc.get("admin") if isinstance(doc, dict) else None
        if isinstance(admin, dict):
            listen = admin.get("listen")
            token_env = admin.get("token_env") or token_env
    base = args.admin or (f"http://{listen}" if listen else DEFAULT_ADMIN)
    if "://" not in base:
        base = "http://" + base
    return base.rstrip("/"), str(token_env)


def _table(items: list[dict[str, Any]]) -> None:
    if not items:
        print("no approvals")
        return
    now = time.time()
    rows = [("ID", "STATE", "CLIENT", "DESTINATION", "RULE", "LEFT/DECISION")]
    for a in items:
        client = a.get("client_name") or a.get("client") or "-"
        dest = f"{a.get('method') or ''} {a['host']}:{a['port']}{a.get('path') or ''}".strip()
        if a["state"] == "pending":
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
