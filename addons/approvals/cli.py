"""`portcullis approvals list|allow|deny` (through addons/admin/client.py) and `portcullis webhook-verify`."""

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

from addons.admin.client import call
from addons.approvals.errors import ApprovalError
from addons.approvals.model import Choice, Scope, State
from addons.approvals.webhook import VerifyError, verify


def approvals_command(args: argparse.Namespace) -> int:
    """List or decide approvals on a running proxy. 0 ok, 1 refused (with the server's message)."""

    def send(client: httpx.Client) -> httpx.Response:
        if args.action == "list":
            return client.get("/approvals")
        body = {"decision": Choice(args.action).value, "scope": Scope(args.scope).value,
                "by": args.by or _user(), "reason": args.reason}
        return client.post(f"/approvals/{args.id}", json=body)

    answer = call("portcullis approvals", args, send)
    doc = answer.doc
    if args.json and doc is not None:
        print(json.dumps(doc, indent=2))
    elif answer.code == 0 and args.action == "list":
        _table(doc.get("approvals", []))
    elif answer.code == 0:
        print(f"{doc['id']}: {doc['state']} ({doc['scope']}) {doc['host']}:{doc['port']} by {doc['by']}")
    return answer.code


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


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
