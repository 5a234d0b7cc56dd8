"""`portcullis credentials mint|list|revoke`: task credentials on a running proxy's admin API
(through addons/admin/client.py)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx

from addons.admin.client import call


def credentials_command(args: argparse.Namespace) -> int:
    """0 ok, 1 refused (with the server's message), 2 bad arguments."""
    labels: dict[str, str] = {}
    for item in getattr(args, "label", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"portcullis credentials: bad --label {item!r} (use KEY=VALUE)", file=sys.stderr)
            return 2
        labels[key] = value

    def send(client: httpx.Client) -> httpx.Response:
        if args.action == "mint":
            body: dict[str, Any] = {"task_id": args.task, "labels": labels}
            if args.profile:
                body["profile"] = args.profile
            if args.ttl:
                body["ttl"] = args.ttl
            return client.post("/credentials", json=body)
        if args.action == "list":
            return client.get("/credentials")
        return client.delete(f"/credentials/{args.task}")

    answer = call("portcullis credentials", args, send, ok=(200, 201))
    if answer.code:
        return answer.code
    doc = answer.doc
    if args.json or args.action == "mint":
        # The secret is shown once: print the whole answer (an orchestrator reads it as JSON).
        print(json.dumps(doc, indent=2))
    elif args.action == "list":
        _table(doc.get("credentials", []))
    else:
        print(f"{doc['task_id']}: revoked")
    return 0


def _table(items: list[dict[str, Any]]) -> None:
    if not items:
        print("no credentials")
        return
    for c in items:
        labels = ",".join(f"{k}={v}" for k, v in (c.get("labels") or {}).items())
        print(f"{c['task_id']:<24} {c['state']:<8} {c.get('profile') or '-':<12} expires {c['expires_at']}"
              + (f"  {labels}" if labels else ""))


def add_parser(sub: Any) -> None:
    cred = sub.add_parser("credentials", help="mint, list or revoke task credentials on a running proxy")
    cred.add_argument("--admin", metavar="URL", help="admin base URL (default: from --config)")
    cred.add_argument("--config", help="config file: the admin address and token (default: portcullis.yaml)")
    cred.add_argument("--json", action="store_true")
    actions = cred.add_subparsers(dest="action", required=True, metavar="ACTION")
    mint = actions.add_parser("mint", help="a credential for one agent task (prints the secret, once)")
    mint.add_argument("--task", required=True, metavar="TASK_ID")
    mint.add_argument("--profile", metavar="NAME")
    mint.add_argument("--ttl", metavar="DURATION", help="e.g. 30m, 8h (default: credentials.default_ttl)")
    mint.add_argument("--label", action="append", metavar="KEY=VALUE")
    actions.add_parser("list", help="every credential (never a secret)")
    rev = actions.add_parser("revoke", help="revoke a task's credential at once, on every process")
    rev.add_argument("task", metavar="TASK_ID")
