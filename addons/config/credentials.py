"""Credential rules (`credentials:` beside `rules:` in a rule file): checked with positions, their
secrets read from the environment or a file, compiled into the policy's CredentialSet.

Secrets are read on every load (start and each reload), never cached with the rule file: rotating a
secret file and reloading takes the new value. An error message never contains a secret.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from addons.config.models import CredentialModel
from addons.config.yamlio import ErrorList, pos
from addons.policy.credentials import (
    MIN_SECRET,
    Apply,
    ApplyKind,
    Credential,
    CredentialApproval,
    CredentialSet,
    Secret,
    compile_needles,
)
from addons.policy.evaluate import Settings, compile_paths
from addons.policy.hosts import HostError, is_ip, normalize_host, registered_domain

_METHOD = re.compile(r"^[A-Z][A-Z0-9_-]*$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110 token)
# Headers that frame or route the request, or belong to the proxy: a credential never sets them.
_FORBIDDEN_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer", "keep-alive",
    "proxy-authorization", "proxy-connection", "expect", "content-type", "content-encoding",
})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
DEFAULT_PLACEHOLDER = "portcullis-credential-{name}"


@dataclass(frozen=True)
class CredentialEntry:
    """One `credentials:` item of a rule file, shape-checked (the cacheable part of a rule file)."""

    model: CredentialModel
    node: Any  # its YAML node, for positions
    line: int
    ref_file: str
    shown: str


def default_placeholder(name: str) -> str:
    return DEFAULT_PLACEHOLDER.format(name=name)


def read_secret(m: CredentialModel, base_dir: Path, environ: Mapping[str, str]) -> tuple[str | None, str]:
    """(value, problem): the secret with surrounding whitespace removed, or why it is unusable."""
    if m.secret.env is not None:
        value = environ.get(m.secret.env)
        if value is None:
            return None, f"environment variable {m.secret.env} is not set"
        where = f"environment variable {m.secret.env}"
    else:
        assert m.secret.file is not None
        path = base_dir / m.secret.file
        try:
            value = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, f"secret file {m.secret.file} does not exist"
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or "not UTF-8"
            return None, f"secret file {m.secret.file} cannot be read ({why})"
        where = f"secret file {m.secret.file}"
    value = value.strip()
    if not value:
        return None, f"{where} is empty"
    if _CONTROL.search(value):
        return None, f"{where} holds a control character (a line break inside the value?)"
    if len(value) < MIN_SECRET:
        return None, f"{where} holds fewer than {MIN_SECRET} characters"
    return value, ""


def source_text(m: CredentialModel) -> str:
    return f"env {m.secret.env}" if m.secret.env is not None else f"file {m.secret.file}"


def _apply(m: CredentialModel, e: CredentialEntry, label: str, errors: ErrorList) -> Apply | None:
    a = m.apply
    if a.basic is not None:
        user = a.basic.username
        if ":" in user or _CONTROL.search(user):
            errors.add(e.shown, *pos(e.node, ("apply", "basic", "username"), value=True),
                       f"{label}: a Basic username cannot contain ':' or control characters")
            return None
        return Apply(ApplyKind.BASIC, "Authorization", username=user)
    assert a.header is not None
    ok = True
    if not _TOKEN.match(a.header) or a.header.lower() in _FORBIDDEN_HEADERS:
        errors.add(e.shown, *pos(e.node, ("apply", "header"), value=True),
                   f"{label}: {a.header!r} cannot carry a credential (not a header name, or one that "
                   "frames or routes the request)")
        ok = False
    if a.template.count("{secret}") != 1 or a.template.replace("{secret}", "").count("{") \
            or "}" in a.template.replace("{secret}", "") or _CONTROL.search(a.template):
        errors.add(e.shown, *pos(e.node, ("apply", "template"), value=True),
                   f"{label}: the template holds {{secret}} exactly once and no other braces or control "
                   "characters (e.g. \"Bearer {secret}\")")
        ok = False
    return Apply(ApplyKind.HEADER, a.header, template=a.template) if ok else None


def _hosts(m: CredentialModel, e: CredentialEntry, label: str, errors: ErrorList) -> frozenset[str] | None:
    out: set[str] = set()
    ok = True
    for j, raw in enumerate(m.hosts):
        where = pos(e.node, ("hosts", j))
        if "*" in raw:
            errors.add(e.shown, *where, f"{label}: {raw!r}: a credential is bound to exact host names, "
                       "never a wildcard (list each name)")
            ok = False
            continue
        try:
            host = normalize_host(raw)
        except HostError as err:
            errors.add(e.shown, *where, f"{label}: {err}")
            ok = False
            continue
        if is_ip(host):
            errors.add(e.shown, *where, f"{label}: {raw!r} is an IP address; a credential is bound to a "
                       "host name, which the upstream's certificate must prove")
            ok = False
        elif registered_domain(host) is None:
            errors.add(e.shown, *where, f"{label}: {raw!r} is a public suffix or a single label; name the "
                       "exact, fully qualified host")
            ok = False
        out.add(host)
    return frozenset(out) if ok else None


def _refs(m: CredentialModel, e: CredentialEntry, label: str, settings: Settings,
          errors: ErrorList) -> tuple[bool, frozenset[str]]:
    """Profiles and client groups named: known, and (groups) authenticating. Returns (ok, users)."""
    ok = True
    for j, pr in enumerate(m.profiles or ()):
        if pr not in settings.profiles:
            errors.add(e.shown, *pos(e.node, ("profiles", j)), f"{label}: unknown profile {pr!r}")
            ok = False
    users: set[str] = set()
    groups = {g.name: g for g in settings.clients}
    for j, c in enumerate(m.clients or ()):
        g = groups.get(c)
        if g is None:
            errors.add(e.shown, *pos(e.node, ("clients", j)), f"{label}: unknown client group {c!r}")
            ok = False
        elif g.user is None:
            errors.add(e.shown, *pos(e.node, ("clients", j)),
                       f"{label}: client group {c!r} has no proxy_auth; a source address is not an identity, "
                       "so only proxy_auth groups (or task profiles) can be given a credential")
            ok = False
        else:
            users.add(g.user)
    return ok, frozenset(users)


def _conditions(m: CredentialModel, e: CredentialEntry, label: str,
                errors: ErrorList) -> tuple[bool, frozenset[str] | None]:
    ok = True
    methods = None
    if m.methods is not None:
        methods = frozenset(x.upper() for x in m.methods)
        for j, x in enumerate(m.methods):
            if not _METHOD.match(x.upper()) or x.upper() == "CONNECT":
                errors.add(e.shown, *pos(e.node, ("methods", j)), f"{label}: bad method {x!r}")
                ok = False
    for j, p in enumerate(m.paths or ()):
        if not p.startswith("/"):
            errors.add(e.shown, *pos(e.node, ("paths", j)),
                       f"{label}: a path pattern starts with '/' (got {p!r})")
            ok = False
    return ok, methods


def compile_credential(e: CredentialEntry, settings: Settings, base_dir: Path, environ: Mapping[str, str],
                       errors: ErrorList, read: bool = True) -> Credential | None:
    """One credential rule, checked and with its secret (None: every problem is in `errors`)."""
    m = e.model
    label = f"credential {m.name!r}"
    ok = True
    if settings.inspect == "never":
        errors.add(e.shown, *pos(e.node, ("name",)),
                   f"{label}: credentials are injected into inspected TLS only, but tls.inspect is 'never'")
        ok = False
    hosts = _hosts(m, e, label, errors)
    apply = _apply(m, e, label, errors)
    refs_ok, users = _refs(m, e, label, settings, errors)
    cond_ok, methods = _conditions(m, e, label, errors)
    placeholders = tuple(m.placeholders or (default_placeholder(m.name),))
    for j, ph in enumerate(m.placeholders or ()):
        if len(ph) < MIN_SECRET or _CONTROL.search(ph):
            errors.add(e.shown, *pos(e.node, ("placeholders", j)),
                       f"{label}: a placeholder has at least {MIN_SECRET} characters and no control "
                       "characters")
            ok = False
    value: str | None
    if read:
        value, problem = read_secret(m, base_dir, environ)
        if value is None:
            errors.add(e.shown, *pos(e.node, ("secret",), value=True), f"{label}: {problem}")
            ok = False
        elif value in placeholders:
            errors.add(e.shown, *pos(e.node, ("secret",), value=True),
                       f"{label}: the secret equals a placeholder")
            ok = False
    else:
        value = "unread-" + secrets.token_hex(16)  # check/test/validate --no-secrets: never the real one
    if not (ok and refs_ok and cond_ok) or hosts is None or apply is None or value is None:
        return None
    secret = Secret(value)
    patterns = compile_needles(secret, placeholders)
    return Credential(
        name=m.name, file=e.ref_file, line=e.line, hosts=hosts, ports=frozenset(m.ports), apply=apply,
        secret=secret, source=source_text(m), methods=methods,
        paths=tuple(m.paths) if m.paths is not None else None,
        profiles=frozenset(m.profiles) if m.profiles is not None else None,
        clients=frozenset(m.clients) if m.clients is not None else None, client_users=users,
        approval=CredentialApproval(m.approval), placeholders=placeholders,
        secret_file=os.path.abspath(base_dir / m.secret.file) if m.secret.file is not None else None,
        needles=patterns, _path_re=compile_paths(m.paths) if m.paths is not None else None,
    )


def compile_credentials(entries: Sequence[CredentialEntry], settings: Settings, base_dir: Path,
                        errors: ErrorList, *, read: bool = True,
                        environ: Mapping[str, str] | None = None) -> CredentialSet:
    """Every credential rule of every file: unique names and placeholders, secrets read now."""
    env = os.environ if environ is None else environ
    out: list[Credential] = []
    seen: dict[str, str] = {}
    owners: dict[str, str] = {}
    for e in entries:
        where = f"{e.shown}:{e.line}"
        name_pos = pos(e.node, ("name",), value=True)
        if e.model.name in seen:
            errors.add(e.shown, *name_pos, f"duplicate credential name {e.model.name!r} (first defined at "
                       f"{seen[e.model.name]})")
            continue
        seen[e.model.name] = where
        cred = compile_credential(e, settings, base_dir, env, errors, read)
        if cred is None:
            continue
        clash = next((p for p in cred.placeholders if p in owners), None)
        if clash is not None:
            errors.add(e.shown, *name_pos, f"credential {cred.name!r}: placeholder {clash!r} is already "
                       f"credential {owners[clash]!r}'s")
            continue
        owners.update((p, cred.name) for p in cred.placeholders)
        out.append(cred)
    return CredentialSet(out)
