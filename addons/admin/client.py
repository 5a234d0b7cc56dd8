"""The console commands' side of the admin API: where it is, the token, one call, its errors.

`portcullis approvals ...` and `portcullis credentials ...` both talk to a running proxy's admin API:
the address and token variable come from `--admin`, else the config's `admin` section (`--config`,
else ./portcullis.yaml when it exists), else the defaults; the token from that variable, else the
`state/admin-token` file `./dev run` writes next to the config (refused when other users can read
it). `call` makes one request and turns every failure into one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

DEFAULT_ADMIN = "http://127.0.0.1:9090"
DEFAULT_TOKEN_ENV = "PORTCULLIS_ADMIN_TOKEN"  # noqa: S105 (a variable name)
DEFAULT_CONFIG = "portcullis.yaml"
# Where `./dev run` keeps the admin token it made, relative to the config file's folder.
TOKEN_FILE = Path("state") / "admin-token"
TIMEOUT_S = 15.0


class AdminClientError(Exception):
    """The admin API cannot be addressed: an unreadable config or token file."""


@dataclass(frozen=True, slots=True)
class Answer:
    """The admin API's answer: 0 and its JSON, or 1 (already reported on stderr) and what it said."""

    code: int
    doc: Any


def target(args: argparse.Namespace) -> tuple[str, str, Path | None]:
    """Admin base URL, token variable and config file (see the module's docstring)."""
    listen, token_env = None, DEFAULT_TOKEN_ENV
    config: Path | None = Path(args.config) if args.config else Path(DEFAULT_CONFIG)
    if not args.config and not Path(DEFAULT_CONFIG).is_file():
        config = None
    if config is not None:
        try:
            doc = YAML(typ="safe").load(config.read_text(encoding="utf-8")) or {}
        except (OSError, YAMLError) as e:
            raise AdminClientError(f"cannot read {config}: {e}") from e
        admin = doc.get("admin") if isinstance(doc, dict) else None
        if isinstance(admin, dict):
            listen = admin.get("listen")
            token_env = admin.get("token_env") or token_env
    base = args.admin or (f"http://{listen}" if listen else DEFAULT_ADMIN)
    if "://" not in base:
        base = "http://" + base
    return base.rstrip("/"), str(token_env), config


def token(token_env: str, config: Path | None) -> tuple[str, str]:
    """The admin token and where it came from: the variable, else `state/admin-token` in the config
    file's folder. A token file other users can read or write is refused."""
    value = os.environ.get(token_env, "")
    if value or config is None:
        return value, f"${token_env}"
    path = config.parent / TOKEN_FILE
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return "", f"${token_env} (unset; no {path} either)"
    except OSError as e:
        raise AdminClientError(f"cannot read the admin token in {path}: {e.strerror or e}") from e
    with os.fdopen(fd, encoding="utf-8") as fh:
        st = os.fstat(fh.fileno())
        if st.st_mode & 0o077:
            raise AdminClientError(
                f"{path} is open to other users (mode {st.st_mode & 0o777:04o}); the admin token must be "
                f"private: chmod 600 {path}")
        if st.st_uid not in (os.geteuid(), 0):
            raise AdminClientError(f"{path} belongs to another user (uid {st.st_uid}); not using it")
        value = fh.read(4096).strip()
    if not value:
        raise AdminClientError(f"{path} is empty (delete it and run ./dev run again, or set ${token_env})")
    return value, str(path)


def call(prog: str, args: argparse.Namespace, send: Callable[[httpx.Client], httpx.Response],
         ok: tuple[int, ...] = (200,)) -> Answer:
    """One request to the admin API `args` point at. Anything but an `ok` status is one line on
    stderr naming the server's message (and, for a 401, where the token came from)."""
    try:
        base, token_env, config = target(args)
        value, source = token(token_env, config)
    except AdminClientError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return Answer(1, None)
    headers = {"Authorization": f"Bearer {value}"} if value else {}
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=TIMEOUT_S, trust_env=False) as client:
            resp = send(client)
    except httpx.HTTPError as e:
        print(f"{prog}: cannot reach the admin API at {base}: {e}", file=sys.stderr)
        return Answer(1, None)
    try:
        doc: Any = resp.json()
    except ValueError:
        doc = {"message": resp.text.strip()}
    if resp.status_code in ok:
        return Answer(0, doc)
    msg = doc.get("message") if isinstance(doc, dict) else None
    hint = f" (check the token in {source})" if resp.status_code == 401 else ""
    print(f"{prog}: refused, HTTP {resp.status_code}: {msg or resp.reason_phrase}{hint}", file=sys.stderr)
    return Answer(1, doc)
