"""Authority parsing (`host:port`, `[v6]:port`) and the Host/target consistency check, shared by the
proxy (host_mismatch) and `portcullis check`."""

from __future__ import annotations

from addons.policy.hosts import HostError, normalize_host

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class AuthorityError(ValueError):
    """An authority (Host header, request target) that cannot be parsed."""


def split_authority(raw: str, allow_zero: bool = False) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]`, `[v6]:port` -> (host text, port or None). Strict on the port
    (`allow_zero`: port 0 means "any free port", for listen addresses)."""
    raw = raw.strip()
    if not raw:
        raise AuthorityError("empty host")
    if any(c in raw for c in " \t\r\n/\\@?#"):
        raise AuthorityError(f"{raw!r} is not a host name (contains a space, '/', '@', '?', '#' or similar)")
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise AuthorityError(f"unclosed '[' in {raw!r}")
        host, rest = raw[: end + 1], raw[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise AuthorityError(f"bad authority {raw!r}")
        return host, _port(rest[1:], raw, allow_zero)
    if raw.count(":") == 1:
        host, port = raw.split(":")
        if not host:  # ":8080" is not "every interface": a listen address or Host names its host
            raise AuthorityError(f"no host before the port in {raw!r}")
        return host, _port(port, raw, allow_zero)
    if ":" in raw:  # a bare IPv6 address without brackets is not a valid Host header
        raise AuthorityError(f"bad authority {raw!r}")
    return raw, None


def _port(text: str, raw: str, allow_zero: bool = False) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        raise AuthorityError(f"bad port in {raw!r}")
    port = int(text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise AuthorityError(f"bad port in {raw!r}")
    return port


def same_destination(header_value: str, host: str, port: int, scheme: str) -> bool:
    """Does a Host header (or :authority) name exactly `host`:`port` (host already normalised)?"""
    try:
        h, p = split_authority(header_value)
        norm = normalize_host(h)
    except ValueError:
        return False
    if p is None:
        p = DEFAULT_PORTS.get(scheme, port)
    return norm == host and p == port


def names_port_zero(raw: str) -> bool:
    """Does an authority name port 0 explicitly (`host:0`, `host:000`)? Port 0 is no destination."""
    try:
        return split_authority(raw, allow_zero=True)[1] == 0
    except AuthorityError:
        return False


def connect_authority_problem(raw: str, host: str, port: int) -> str | None:
    """Why a CONNECT target as received is not plainly `host:port` (host normalised), or None.

    mitmproxy's parser reads Unicode digits as a port (`:８０` is 80) and drops brackets around
    any host (`[public.test]`); only ASCII digits and brackets around an IPv6 address name one.
    """
    text, sep, digits = raw.rpartition(":")
    if not sep or not digits.isascii() or not digits.isdigit():
        return "the CONNECT port is not ASCII digits"
    if int(digits) != port:
        return "the CONNECT port is not the port read"
    try:
        norm = normalize_host(text)
    except HostError as e:
        return f"bad CONNECT host: {e}"
    return None if norm == host else "the CONNECT host is not the host read"


def format_authority(host: str, port: int, scheme: str) -> str:
    """`host[:port]` for a Host header: IPv6 in brackets, the scheme's default port left out."""
    shown = f"[{host}]" if ":" in host else host
    return shown if DEFAULT_PORTS.get(scheme) == port else f"{shown}:{port}"
