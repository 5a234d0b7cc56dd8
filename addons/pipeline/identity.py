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
from typing import Any, Protocol

from addons.config.models import Config
from addons.credentials.model import Check, Credential


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
        """(result, user) for the static proxy_auth users alone (`header`: the raw Proxy-Authorization)."""
        if header is None:
            if client_ip is not None and self.requires(client_ip):
                return AuthResult.BAD, None
            return AuthResult.NONE, None
        parsed = parse_basic(header)
        if parsed is None or not self.verify(*parsed):
            return AuthResult.BAD, None
        return AuthResult.OK, parsed[0]

    def is_user(self, user: str) -> bool:
        return user in self._creds

    @property
    def users(self) -> frozenset[str]:
        return frozenset(self._creds)

    def verify(self, user: str, password: str) -> bool:
        """Compared against every configured credential, so the time taken says nothing about which."""
        u, p = user.encode("utf-8", "surrogateescape"), password.encode("utf-8", "surrogateescape")
        found = False
        for cred in self._creds.values():
            ok_user = hmac.compare_digest(u, cred.user)
            ok_pw = hmac.compare_digest(p, cred.password)
            found |= ok_user and ok_pw
        return found

    def requires(self, client_ip: str | None) -> bool:
        """Does a client group with proxy_auth cover this source address (credentials required)?"""
        return client_ip is not None and self._requires(client_ip)

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


def parse_basic(header: str) -> tuple[str, str] | None:
    """`Basic base64(user:password)` -> (user, password); None for anything else."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = raw.partition(b":")
    if not sep or not user:
        return None
    return user.decode("utf-8", "surrogateescape"), password.decode("utf-8", "surrogateescape")


class TaskCredentials(Protocol):
    """The task credentials service (addons/credentials/service.py), as identification uses it."""

    def knows(self, user: str) -> bool: ...
    async def verify(self, task_id: str, secret: str) -> tuple[Check, Credential | None]: ...
    def still_valid(self, task_id: str) -> bool: ...
