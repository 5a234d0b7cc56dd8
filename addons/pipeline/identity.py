"""Proxy-Authorization (Basic) for client groups with `proxy_auth`; passwords compared in constant time."""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from addons.config.models import Config


class AuthConfigError(Exception):
    """A proxy_auth password variable is not set (the proxy refuses to start)."""


class AuthResult(Enum):
    NONE = "none"  # no credentials presented, none required
    OK = "ok"
    BAD = "bad"  # credentials presented but wrong or malformed, or required and missing


@dataclass(frozen=True)
class _Cred:
    user: bytes
    password: bytes


class ProxyAuth:
    """Checks credentials. A request with no credentials is identified by source CIDR only, except
    from a CIDR of a client group that also has proxy_auth: that group requires credentials."""

    def __init__(self, config: Config, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._creds: dict[str, _Cred] = {}
        self._required: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        missing: list[str] = []
        for client in config.clients:
            if client.proxy_auth is None:
                continue
            pw = env.get(client.proxy_auth.password_env)
            if not pw:
                missing.append(
                    f"client {client.name!r}: environment variable {client.proxy_auth.password_env} "
                    "(its proxy_auth password) is not set"
                )
                continue
            self._creds[client.proxy_auth.user] = _Cred(client.proxy_auth.user.encode(), pw.encode())
            self._required.extend(ipaddress.ip_network(c, strict=False) for c in client.cidrs)
        if missing:
            raise AuthConfigError("; ".join(missing))

    @property
    def enabled(self) -> bool:
        return bool(self._creds)

    def check(self, header: str | None, client_ip: str | None) -> tuple[AuthResult, str | None]:
        """(result, user). `header` is the raw Proxy-Authorization value or None."""
        if header is None:
            if client_ip is not None and self._requires(client_ip):
                return AuthResult.BAD, None
            return AuthResult.NONE, None
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "basic" or not value:
            return AuthResult.BAD, None
        try:
            raw = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return AuthResult.BAD, None
        user, sep, password = raw.partition(b":")
        if not sep:
            return AuthResult.BAD, None
        # Compare against every credential so timing does not depend on which user exists.
        found: str | None = None
        for name, cred in self._creds.items():
            ok_user = hmac.compare_digest(user, cred.user)
            ok_pw = hmac.compare_digest(password, cred.password)
            if ok_user and ok_pw:
                found = name
        if found is None:
            return AuthResult.BAD, None
        return AuthResult.OK, found

    def _requires(self, client_ip: str) -> bool:
        if not self._required:
            return False
        try:
            addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr.version == net.version and addr in net for net in self._required)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def public_client_refusal(peer: tuple[Any, ...] | None, client_cidrs: Sequence[IPNetwork]) -> str | None:
    """mitmproxy's default (its Block addon, not loaded here): a proxy is not for clients on the
    public internet. A global client address is refused unless a configured client group names it."""
    if not peer:
        return None
    try:
        addr = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_global and not any(addr.version == n.version and addr in n for n in client_cidrs):
        return f"clients from public addresses ({addr}) are not served; name them in a clients: cidrs group"
    return None
