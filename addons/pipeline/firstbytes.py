"""The authority check for a tunnel's first bytes: anything a TLS server would read as a ClientHello
must name exactly the CONNECT authority (the pipeline's step 2, applied when the bytes arrive)."""

from __future__ import annotations

from enum import Enum

from addons.pipeline.clienthello import FirstBytes, HandshakeWatch, Kind, read_first_bytes
from addons.pipeline.model import Outcome
from addons.policy.hosts import HostError, is_ip, normalize_host


class Relay(Enum):
    """What an allowed tunnel carries, once its first bytes are judged."""

    WAIT = "wait"  # not enough bytes yet
    RAW = "raw"  # opaque bytes (raw_tcp only)
    TLS = "tls"  # TLS passed through, its cleartext handshake watched (HandshakeWatch)
    INSPECT = "inspect"  # TLS intercepted: every inner request is decided on its own
    REFUSE = "refuse"  # close before one byte is relayed (a second decision: sni_mismatch)


def judge_first_bytes(tunnel: Outcome, data: bytes, server_spoke: bool) -> tuple[Relay, str | None]:
    """(how to relay, why it is refused). No server name only for an IP literal or raw_tcp; a name
    that is present but unreadable, invalid or one of several is refused everywhere; bytes no TLS
    server reads as TLS only for raw_tcp (never when inspected)."""
    fb = read_first_bytes(data)
    if fb.kind is Kind.NEED_MORE:
        if data or not server_spoke:
            return Relay.WAIT, None
        # The server spoke first: not TLS from the client, so only raw_tcp tunnels carry it.
        if tunnel.raw_tcp and not tunnel.inspect:
            return Relay.RAW, None
        return Relay.REFUSE, "the server spoke first (not a TLS tunnel)"
    if fb.kind is Kind.BAD:
        return Relay.REFUSE, fb.problem
    if fb.kind is Kind.NOT_TLS:
        if tunnel.inspect or not tunnel.raw_tcp:
            return Relay.REFUSE, fb.problem
        return Relay.RAW, None
    if problem := sni_problem(tunnel, fb):
        return Relay.REFUSE, problem
    return (Relay.INSPECT if tunnel.inspect else Relay.TLS), None


def sni_problem(tunnel: Outcome, hello: FirstBytes) -> str | None:
    """A ClientHello's server name against the tunnel: equal to the authority, or absent where allowed."""
    host = tunnel.request.host
    if hello.sni is None:
        if not is_ip(host) and not tunnel.raw_tcp:
            return "the TLS ClientHello has no server name"
        return None
    try:
        sni: str | None = normalize_host(hello.sni)
    except HostError:
        sni = None
    if sni != host:
        return "the TLS server name differs from the CONNECT host"
    return None


def handshake_watch(tunnel: Outcome) -> HandshakeWatch:
    """Every further ClientHello of a passed-through handshake (after a retry request) judged alike."""
    return HandshakeWatch(lambda hello: sni_problem(tunnel, hello))
