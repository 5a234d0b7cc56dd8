"""Every use of mitmproxy's private APIs, in this one package (tests/proxy/mitm_compat/ checks
each assumption against the installed mitmproxy and fails loudly when an upgrade changes one).
Nothing else in addons/ imports mitmproxy's internals; import the names below from here.

- `refusals`: the error pages mitmproxy writes itself (unparsable requests, failed upstream
  connects) swapped for Portcullis's JSON answers (no hook can replace those bytes); those refusals
  are decisions: the server-side HTTP/1 and HTTP/2 layers are tracked so that the builders know
  which client they answer (one `bad_request` decision per refusal, GOAWAYs too); HTTP/1 bytes of a
  response.
- `parsing`: reading requests: authority and host checks raise only ValueError (its 400), leading
  empty lines are skipped, an HTTP/1 head is bounded as it arrives (414/431) and in time (408), a
  denial is sent before the body; the request target's raw bytes (`Request.data`).
- `layers`: tunnels: the NextLayer addon asking Portcullis first, byte-counting relays built from
  mitmproxy's TCP and TLS layers (with the handshake watch), a layer that closes both sides, and a
  pinned upstream given its name back once connected.
- `sockets`: the listening sockets: their accept queue, their addresses, accepting on a socket
  inherited from the supervisor.
- `backpressure`: a client connection with a hook pending (a request held for a person) is not
  read past a bound, so its sender blocks instead of the proxy's memory growing.
- `closing`: a connection a layer closes is closed even when its reader was cancelled while
  waiting to hand mitmproxy more bytes (mitmproxy then left the socket open and unread).
- `speed`: what is changed for speed: mitmproxy's debug-mode type checks of every Request and
  Response dropped, and hook dispatch without walking every addon for every hook.
"""

from __future__ import annotations

from collections.abc import Callable

from addons.proxy.mitm_compat import backpressure, closing, parsing, refusals, speed
from addons.proxy.mitm_compat.layers import (
    CloseBoth,
    CountingRelay,
    CountingServerTLSLayer,
    Counts,
    TunnelAwareNextLayer,
    Watch,
    counting_interception,
    set_open_server_address,
)
from addons.proxy.mitm_compat.parsing import (
    DRAIN_LIMIT,
    answer_at_once,
    harden_request_parsing,
    raw_target,
    set_head_timeout,
)
from addons.proxy.mitm_compat.refusals import ErrorBuilder, Refusal, Reporter, already_refused, http1_bytes
from addons.proxy.mitm_compat.sockets import listen_addresses, listen_on, raise_listen_backlog

__all__ = [
    "DRAIN_LIMIT",
    "SUPPORTED",
    "CloseBoth",
    "Counts",
    "CountingRelay",
    "CountingServerTLSLayer",
    "ErrorBuilder",
    "Refusal",
    "Reporter",
    "TunnelAwareNextLayer",
    "Watch",
    "already_refused",
    "answer_at_once",
    "check_version",
    "counting_interception",
    "harden_request_parsing",
    "http1_bytes",
    "install",
    "listen_addresses",
    "listen_on",
    "raise_listen_backlog",
    "raw_target",
    "set_head_timeout",
    "set_open_server_address",
]

SUPPORTED = ((12, 2), (12, 3))  # [from, to): the versions whose internals this package was checked against


def check_version() -> str | None:
    """None when the installed mitmproxy is one this package supports, else what to do."""
    from mitmproxy import version

    parts = tuple(int(p) for p in version.VERSION.split(".")[:2])
    if SUPPORTED[0] <= parts < SUPPORTED[1]:
        return None
    return (
        f"mitmproxy {version.VERSION} is not supported (Portcullis relies on internals checked for "
        f"{SUPPORTED[0][0]}.{SUPPORTED[0][1]}.x); install 'mitmproxy>=12.2,<12.3' (pip install -e .)"
    )


def install(
    http1_page: ErrorBuilder,
    body: ErrorBuilder,
    h2_headers: Callable[[int], list[tuple[bytes, bytes]]],
    reporter: Reporter,
) -> None:
    """Swap mitmproxy's error pages for ours, report every refusal (4xx page or GOAWAY) it makes,
    harden and bound its request reading, stop reading held clients past a bound, close what its
    layers close, and speed up its hook dispatch. Idempotent (the reporter is replaced).

    `http1_page(status, message)` is a whole HTTP/1 response; `body(status, message)` an HTTP/2 body;
    `h2_headers(status)` the headers for that body (besides `:status`).
    """
    from mitmproxy.proxy.layers.http import _http1

    refusals.set_reporter(reporter)
    if getattr(_http1, "_portcullis_installed", False):
        return
    parsing.install()  # first: refusals then tracks the bounded reader (its 414/431 are reported)
    refusals.install(http1_page, body, h2_headers)
    speed.install()
    backpressure.install()
    closing.install()
    _http1._portcullis_installed = True  # type: ignore[attr-defined]
