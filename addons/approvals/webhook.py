"""Standard Webhooks signing/verification and the retrying webhook sender."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from addons.approvals.errors import ApprovalError
from addons.background import spawn
from addons.telemetry.events import Telemetry

SECRET_PREFIX = "whsec_"  # noqa: S105 (a format prefix, not a secret)
TIMEOUT_S = 10.0
_THROTTLE = {429, 502, 503, 504}  # honour Retry-After on these
log = logging.getLogger(__name__)


class VerifyError(Exception):
    """A webhook failed verification; the message says why."""


def parse_secret(value: str) -> bytes:
    """`whsec_<base64>` (as Standard Webhooks issue them) -> the HMAC key bytes."""
    if not value.startswith(SECRET_PREFIX):
        raise ApprovalError("a webhook secret must look like whsec_<base64> (Standard Webhooks format)")
    try:
        key = base64.b64decode(value[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApprovalError("the webhook secret after whsec_ is not valid base64") from e
    if len(key) < 16:
        raise ApprovalError("the webhook secret is too short: use 24 to 64 random bytes")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value for one attempt: `v1,<base64 HMAC-SHA256 of id.ts.body>`."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str | bytes | list[str | bytes], headers: Mapping[str, str], body: bytes,
           tolerance_s: int = 300, now: float | None = None) -> None:
    """Check a received webhook; raises VerifyError, returns None when it is genuine.

    `secret` is a `whsec_` string or key bytes, or a list of them (rotation). `headers` needs
    webhook-id, webhook-timestamp and webhook-signature (case-insensitive). Sign over the raw
    bytes exactly as received; never re-serialise the JSON first.
    """
    low = {k.lower(): v for k, v in headers.items()}
    msg_id, ts_text, sigs = low.get("webhook-id"), low.get("webhook-timestamp"), low.get("webhook-signature")
    if not msg_id or not ts_text or not sigs:
        raise VerifyError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        ts = int(ts_text)
    except ValueError as e:
        raise VerifyError("webhook-timestamp is not an integer") from e
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        raise VerifyError(f"webhook-timestamp is more than {tolerance_s}s away from now (replay?)")
    secrets = secret if isinstance(secret, list) else [secret]
    keys = [parse_secret(s) if isinstance(s, str) else s for s in secrets]
    offered = [s.split(",", 1)[1] for s in sigs.split() if s.startswith("v1,")]
    for key in keys:
        expected = sign(key, msg_id, ts, body).split(",", 1)[1]
        if any(hmac.compare_digest(expected.encode(), o.encode()) for o in offered):
            return
    raise VerifyError("no webhook-signature matches")


def redact_url(url: str) -> str:
    """The URL without credentials or query string, safe for events and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str
    key: bytes
    timeout: float = TIMEOUT_S  # one attempt, from connect to the status line (webhooks[].timeout)


class WebhookSender:
    """Delivers one thin payload per approval to every endpoint, retrying until the approval expires.

    Backoff is exponential with full jitter (base, 2*base, ... capped), never past expires_at.
    2xx is success; 410 stops; everything else (3xx included: redirects are not followed, a refused
    connection, an attempt past the endpoint's timeout, an answer that is not HTTP) retries. Only the
    status line counts: the answer's body is never read, so a receiver cannot make the proxy buffer it.
    The first failed attempt of a delivery is logged at once (`webhook.failed`, final false), the
    last one when delivery gives up (final true).
    """

    def __init__(self, endpoints: list[Endpoint], telemetry: Telemetry, *,
                 clock: Callable[[], float] = time.time, backoff_base: float = 0.5,
                 backoff_cap: float = 60.0) -> None:
        self.endpoints = endpoints
        self.telemetry = telemetry
        self.clock = clock
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        # trust_env=False: HTTP(S)_PROXY in this process may point at Portcullis itself. That also drops
        # httpx's SSL_CERT_FILE support, so an internal CA for webhook endpoints is honoured explicitly.
        cafile = os.environ.get("SSL_CERT_FILE")
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=cafile) if cafile else True
        self._client = httpx.AsyncClient(follow_redirects=False, timeout=TIMEOUT_S, trust_env=False,
                                         verify=verify)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def send(self, approval_id: str, payload: dict[str, Any], expires_at: float,
             still_pending: Callable[[], Awaitable[bool]], on_done: Callable[[], None] | None = None) -> None:
        """Start one delivery task per endpoint (returns at once). `still_pending` asks the store.

        `on_done` runs once every endpoint has a final answer (delivered, 410, or given up),
        not when delivery was cut short by stop(): then it is re-sent after a restart.
        """
        body = json.dumps(payload, separators=(",", ":")).encode()
        left = [len(self.endpoints)]

        def finished(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if task.cancelled() or task.exception() is not None:
                return
            left[0] -= 1
            if left[0] == 0 and on_done is not None:
                on_done()

        for i, ep in enumerate(self.endpoints):
            # webhook-id: stable across the retries of one approval to one endpoint (the idempotency key).
            msg_id = f"msg_{approval_id}_{i}"
            task = spawn(self._deliver(ep, msg_id, approval_id, body, expires_at, still_pending),
                         f"webhook {msg_id}")
            self._tasks.add(task)
            task.add_done_callback(finished)

    async def _deliver(self, ep: Endpoint, msg_id: str, approval_id: str, body: bytes,
                       expires_at: float, still_pending: Callable[[], Awaitable[bool]]) -> None:
        attempt, last, status = 0, "", None
        m = self.telemetry.metrics.webhook_deliveries
        while True:
            attempt += 1
            retry_after: float | None = None
            status = None
            ts = int(self.clock())
            headers = {"content-type": "application/json", "webhook-id": msg_id,
                       "webhook-timestamp": str(ts), "webhook-signature": sign(ep.key, msg_id, ts, body),
                       "user-agent": "portcullis-webhook"}
            try:
                status, retry_after = await self._attempt(ep, body, headers)
                last = f"HTTP {status}"
                if 200 <= status < 300:
                    m.labels("success").inc()
                    return
                if status == 410:
                    m.labels("gone").inc()
                    self._failed(ep, approval_id, attempt, status, "endpoint answered 410 Gone", "gone")
                    return
            except (httpx.HTTPError, TimeoutError, OSError) as e:
                last = _describe(e, ep.timeout)
            except Exception as e:  # noqa: BLE001 - a receiver's answer must never end delivery unlogged
                log.warning("webhook %s: unexpected error, retrying: %r", msg_id, e)
                last = _describe(e, ep.timeout)
            if attempt == 1:  # say it now: approvers are not being told, and the approval is waiting
                self._failed(ep, approval_id, attempt, status, f"{last}; retrying until the approval "
                             "expires", "retry", final=False)
            delay = random.uniform(0, min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1)))  # noqa: S311
            if retry_after is not None:
                delay = max(delay, retry_after)
            if self.clock() + delay >= expires_at or not await still_pending():
                m.labels("failed").inc()
                if await still_pending():
                    self._failed(ep, approval_id, attempt, status, f"gave up at expiry; last: {last}",
                                 "expired")
                return
            m.labels("retry").inc()
            await asyncio.sleep(delay)
            if not await still_pending():  # decided meanwhile: nobody needs the notification any more
                return

    async def _attempt(self, ep: Endpoint, body: bytes, headers: dict[str, str]) -> tuple[int, float | None]:
        """One POST: (status, Retry-After) within the endpoint's timeout, connect to status line. The
        body of the answer is not read (closing the stream drops the connection)."""
        assert self._client is not None, "WebhookSender.start() not called"
        async with asyncio.timeout(ep.timeout):
            async with self._client.stream("POST", ep.url, content=body, headers=headers,
                                           timeout=ep.timeout) as resp:
                status = resp.status_code
                retry = _retry_after(resp.headers.get("retry-after")) if status in _THROTTLE else None
                return status, retry

    def _failed(self, ep: Endpoint, approval_id: str, attempts: int, status: int | None, error: str,
                why: str, final: bool = True) -> None:
        self.telemetry.emit("webhook.failed", approval_id=approval_id, url=redact_url(ep.url),
                            attempt=attempts, status=status, error=error, final=final, result=why)


def _describe(e: BaseException, timeout: float) -> str:
    """What went wrong with one attempt, for the event (never the receiver's bytes)."""
    if isinstance(e, TimeoutError | httpx.TimeoutException):
        return f"no answer within {timeout:g} s ({type(e).__name__})"
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
