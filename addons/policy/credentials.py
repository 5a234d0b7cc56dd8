"""Credential bindings: a secret the proxy holds, exactly where it may be injected, and the needles
(its placeholders, the secret itself and their encoded forms) that must travel nowhere else.

Pure: the loader (addons/config/credentials.py) reads the secret values and builds these objects; the
pipeline (addons/pipeline/inject.py) decides with them. A secret is wrapped in `Secret`, whose repr and
str never show the value, so no log line, traceback or event can carry it by accident.
"""

from __future__ import annotations

import base64
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NoReturn
from urllib.parse import quote, quote_plus

from addons.policy.model import Client

MIN_SECRET = 8  # shorter values cannot be told apart from ordinary traffic (and are guessable)


class Secret:
    """A secret value. Shown as `Secret(***)` everywhere; `reveal()` is the one way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return "Secret(***)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("Secret", len(self._value)))

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret is never serialised")


class ApplyKind(StrEnum):
    HEADER = "header"  # a header with a template, e.g. "Bearer {secret}"
    BASIC = "basic"  # Authorization: Basic base64(username:secret)


class CredentialApproval(StrEnum):
    NONE = "none"
    FIRST_USE = "first_use"  # the first request of a task that would carry it waits for a person


@dataclass(frozen=True, slots=True)
class Apply:
    """How the secret is put on the request: which header, and its value."""

    kind: ApplyKind
    header: str
    template: str = "{secret}"
    username: str = ""

    def render(self, secret: Secret) -> Secret:
        value = secret.reveal()
        if self.kind is ApplyKind.BASIC:
            raw = f"{self.username}:{value}".encode()
            return Secret("Basic " + base64.b64encode(raw).decode("ascii"))
        return Secret(self.template.replace("{secret}", value))


@dataclass(frozen=True, slots=True)
class Injection:
    """What the proxy sets on one request: the header (replacing every value the agent sent)."""

    credential: str
    header: str
    value: Secret = field(repr=False)


@dataclass(frozen=True, slots=True)
class Credential:
    """One compiled credential rule."""

    name: str
    file: str
    line: int
    hosts: frozenset[str]  # exact, normalised names
    ports: frozenset[int]
    apply: Apply
    secret: Secret = field(repr=False, compare=False)
    source: str = ""  # where the secret comes from ("env GITHUB_TOKEN", "file secrets/gh"): never the value
    methods: frozenset[str] | None = None
    paths: tuple[str, ...] | None = None
    profiles: frozenset[str] | None = None  # task profiles entitled to it
    clients: frozenset[str] | None = None  # proxy_auth client groups entitled to it
    client_users: frozenset[str] = frozenset()  # the proxy_auth users of those groups
    approval: CredentialApproval = CredentialApproval.NONE
    placeholders: tuple[str, ...] = ()
    secret_file: str | None = None  # the file it is read from (watched: a rotation reloads)
    needles: Needles | None = field(default=None, compare=False, repr=False)
    _path_re: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def binds(self, host: str, port: int, method: str, paths: tuple[str, str]) -> bool:
        """Host, port, method and path (as sent and %-decoded: both must match) are bound."""
        if host not in self.hosts or port not in self.ports:
            return False
        if self.methods is not None and method.upper() not in self.methods:
            return False
        return self._path_re is None or all(self._path_re.fullmatch(p) is not None for p in paths)

    def refusal(self, client: Client) -> str | None:
        """Why this client does not get it (None: it does). Only authenticated clients ever do."""
        anyone = self.profiles is None and self.clients is None
        if client.task_id:
            if anyone or (self.profiles is not None and client.profile in self.profiles):
                return None
            return f"task {client.task_id} (profile {client.profile or 'none'}) is not in its profiles"
        if client.user:
            if anyone or client.user in self.client_users:
                return None
            return f"proxy user {client.user} is not in its client groups"
        return "the client is not authenticated (no task credential or proxy_auth user)"

    def carried_in(self, text: str, secret_only: bool = False) -> bool:
        """A placeholder or the secret (or only the secret) in `text`, in any of their forms."""
        n = self.needles
        return n is not None and (n.secret if secret_only else n.text).search(text) is not None

    def carried_in_bytes(self, data: bytes) -> bool:
        return self.needles is not None and self.needles.data.search(data) is not None

    def spans_in(self, data: bytes) -> list[tuple[int, int]]:
        """Where its needles are in `data` (non-overlapping, in order)."""
        return [] if self.needles is None else [m.span() for m in self.needles.data.finditer(data)]

    def redact(self, text: str) -> str:
        """`text` with every needle replaced by `[credential:<name>]` (what an event may show)."""
        return text if self.needles is None else self.needles.text.sub(f"[credential:{self.name}]", text)

    @property
    def longest_needle(self) -> int:
        return self.needles.longest if self.needles is not None else 0


def base64_cores(data: bytes) -> list[bytes]:
    """The base64 text that `data` produces wherever it sits in a longer string: one core per byte
    alignment (0, 1, 2), without the characters its neighbours change. `Basic base64(user:secret)`
    contains one of the secret's cores."""
    out = []
    n = len(data)
    for k in range(3):
        enc = base64.b64encode(b"\x00" * k + data + b"\x00\x00\x00")
        start = -(-8 * k // 6)  # ceil: the first character made of the data's bits only
        end = (8 * (k + n) - 6) // 6 + 1
        core = enc[start:end]
        if len(core) >= 8:
            out.append(core)
    return out


def needles(secret: Secret, placeholders: Iterable[str]) -> list[str]:
    """Every form in which the secret or a placeholder can be spotted in a request."""
    found: list[str] = []
    for value in (secret.reveal(), *placeholders):
        found.append(value)
        found.extend((quote(value, safe=""), quote_plus(value)))
        for core in base64_cores(value.encode()):
            text = core.decode("ascii")
            found.extend((text, text.replace("+", "-").replace("/", "_")))
    return sorted(set(found), key=lambda s: (-len(s), s))


@dataclass(frozen=True, slots=True)
class Needles:
    """A credential's needles, compiled: over text and bytes (longest first), the secret's alone, and the
    longest one's length (what a streamed body holds back). Case-insensitive: a host name (DNS
    exfiltration) or a value a client case-folds still matches."""

    text: re.Pattern[str]
    data: re.Pattern[bytes]
    secret: re.Pattern[str]
    longest: int


def _alternation(found: list[str]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(n) for n in found), re.IGNORECASE)


def compile_needles(secret: Secret, placeholders: Sequence[str]) -> Needles:
    found = needles(secret, placeholders)
    data = re.compile(b"|".join(re.escape(n.encode()) for n in found), re.IGNORECASE)
    return Needles(_alternation(found), data, _alternation(needles(secret, ())),
                   max(len(n.encode()) for n in found))


class CredentialSet:
    """Every credential of a policy, indexed by host. Empty (and free) when none is configured."""

    def __init__(self, creds: Sequence[Credential] = ()) -> None:
        self.creds: tuple[Credential, ...] = tuple(creds)
        self._by_host: dict[str, list[Credential]] = {}
        for c in self.creds:
            for h in c.hosts:
                self._by_host.setdefault(h, []).append(c)
        self.names = frozenset(c.name for c in self.creds)

    def __bool__(self) -> bool:
        return bool(self.creds)

    def __len__(self) -> int:
        return len(self.creds)

    def get(self, name: str) -> Credential | None:
        return next((c for c in self.creds if c.name == name), None)

    def inspects(self, host: str, port: int) -> bool:
        """A credential is bound to host:port: its tunnels are intercepted whatever tls.inspect says."""
        return any(port in c.ports for c in self._by_host.get(host, ()))

    def bound(self, host: str, port: int, method: str, paths: tuple[str, str]) -> list[Credential]:
        """The credentials bound to this request (file order), whoever asks."""
        return [c for c in self._by_host.get(host, ()) if c.binds(host, port, method, paths)]

    def leaked(self, texts: Iterable[str], skip: str | None = None) -> Credential | None:
        """The first credential whose needle is in a text. For `skip` (the one applied to this request)
        only its secret counts: its placeholder may ride to where it is bound, the value never comes
        from the agent (and a request's target is logged)."""
        items = [t for t in texts if t]
        for c in self.creds:
            if any(c.carried_in(t, secret_only=c.name == skip) for t in items):
                return c
        return None

    def redact(self, text: str) -> str:
        """Every credential's needles replaced by `[credential:<name>]`."""
        for c in self.creds:
            text = c.redact(text)
        return text

    def body_watch(self, skip: str | None) -> tuple[Credential, ...]:
        """The credentials whose needles a request body (to which `skip` alone applies) must not carry."""
        return tuple(c for c in self.creds if c.name != skip)
