"""Helpers for the approvals tests that run real proxies: a threaded webhook receiver that verifies every
signature, and the admin API calls (`decide`, `pending`)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from addons.approvals.webhook import VerifyError, verify
from tests.approvals.approvals_support import SECRET, SECRET_ENV, TOKEN
from tests.harness import PortcullisProc

TOKEN_ENV = "PORTCULLIS_TEST_ADMIN_TOKEN"
ENV = {TOKEN_ENV: TOKEN, SECRET_ENV: SECRET}


class HookReceiver:
    """A threaded loopback webhook receiver; records each delivery and whether its signature verified."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    verify(SECRET, dict(self.headers.items()), body)
                    ok = True
                except VerifyError:
                    ok = False
                with outer.cond:
                    outer.got.append({"body": json.loads(body), "verified": ok,
                                      "id": self.headers["webhook-id"]})
                    outer.cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, n: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.got) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"only {len(self.got)} webhooks"
                self.cond.wait(left)
            return list(self.got)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def decide(p: PortcullisProc, approval_id: str, decision: str, scope: str = "once", url: str | None = None,
           token: str = TOKEN) -> httpx.Response:
    return httpx.post(url or f"{p.admin_url}/approvals/{approval_id}",
                      headers={"Authorization": f"Bearer {token}"},
                      json={"decision": decision, "scope": scope, "by": "e2e", "reason": "test"},
                      timeout=10, trust_env=False)


def pending(p: PortcullisProc) -> list[dict[str, Any]]:
    r = httpx.get(f"{p.admin_url}/approvals", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10,
                  trust_env=False)
    return [a for a in r.json()["approvals"] if a["state"] == "pending"]


def wait_for(pred: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
