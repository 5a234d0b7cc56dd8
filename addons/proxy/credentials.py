"""The adapter's side of credential injection: set the header an Outcome names, and watch the bodies of
passing requests for credential needles (addons/pipeline/bodyscan.py), bounded.

A body of declared length up to SCAN_LIMIT is held (not streamed) and read whole in the `request` hook,
before any upstream connection: a needle gets the agent a 403 and nothing leaves. Any other body streams
through StreamScan, which never sends a byte of a needle (it is overwritten); the request's answer is then
refused (the flow is killed at the response). Either way the refusal is a second decision about the flow.
"""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import ctx, http

from addons.pipeline.bodyscan import SCAN_LIMIT, StreamScan, leaked_in
from addons.pipeline.inject import leak_refusal
from addons.pipeline.model import Outcome
from addons.policy.credentials import Credential
from addons.proxy.responses import deny_response


def upstream_verified(flow: http.HTTPFlow, inspected: bool) -> bool:
    """https in an inspected tunnel whose upstream TLS is verified against the name (mitmproxy verifies
    upstream certificates unless ssl_insecure is set, which Portcullis never does; unknown: unverified)."""
    if not inspected or flow.request.scheme != "https":
        return False
    opts = getattr(ctx, "options", None)
    return opts is not None and getattr(opts, "ssl_insecure", True) is False


def inject(flow: http.HTTPFlow, o: Outcome) -> None:
    """Set the credential's header: every value the agent sent under that name is replaced."""
    if o.injection is None:
        return
    flow.request.headers[o.injection.header] = o.injection.value.reveal()


def declared_length(r: http.Request) -> int | None:
    """The body length the request declares (0: no body); None when it is not known in advance."""
    if "transfer-encoding" in r.headers:
        return None
    values = r.headers.get_all("content-length")
    if not values:
        return 0 if r.http_version.startswith("HTTP/1") else None
    try:
        n = int(values[0])
    except ValueError:
        return None
    return n if len(set(values)) == 1 and n >= 0 else None


@dataclass
class _Watched:
    outcome: Outcome
    watch: tuple[Credential, ...]
    scan: StreamScan | None  # None: the body is held and read whole


class BodyWatch:
    """Per passing request with a body: the credentials its body must not carry."""

    def __init__(self) -> None:
        self._flows: dict[str, _Watched] = {}
        self._refuse: set[str] = set()  # streamed bodies that carried a needle: their answer is refused

    def __len__(self) -> int:
        return len(self._flows) + len(self._refuse)

    def start(self, flow: http.HTTPFlow, o: Outcome, watch: tuple[Credential, ...]) -> None:
        """Called once the request passes (stream already set to True by the adapter)."""
        if not watch:
            return
        size = declared_length(flow.request)
        if size == 0:
            return
        if size is not None and size <= SCAN_LIMIT:
            flow.request.stream = False  # held: read whole in the request hook, before any upstream byte
            self._flows[flow.id] = _Watched(o, watch, None)
        else:
            scan = StreamScan(watch)
            flow.request.stream = scan
            self._flows[flow.id] = _Watched(o, watch, scan)

    def finished(self, flow: http.HTTPFlow) -> Outcome | None:
        """The `request` hook (the whole body is in, or was streamed): the refusal to record, if any."""
        w = self._flows.pop(flow.id, None)
        if w is None:
            return None
        if w.scan is None:
            hit = leaked_in(flow.request.raw_content or b"", w.watch)
            if hit is None:
                return None
            refusal = leak_refusal(w.outcome, hit, "held and read before sending: nothing was sent")
            flow.response = deny_response(refusal)
            return refusal
        if w.scan.hit is None:
            return None
        self._refuse.add(flow.id)
        return leak_refusal(w.outcome, w.scan.hit, "streamed: overwritten before sending, the answer refused")

    def refuse_answer(self, flow: http.HTTPFlow) -> bool:
        """`responseheaders`: True when this answer must not reach the agent (kill the flow)."""
        if flow.id not in self._refuse:
            return False
        self._refuse.discard(flow.id)
        return True

    def forget(self, flow: http.HTTPFlow) -> None:
        self._flows.pop(flow.id, None)
        self._refuse.discard(flow.id)
