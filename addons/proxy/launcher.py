"""`portcullis run`: check everything that can fail before listening, then run one proxy process
(addons/proxy/runtime.py) or, with `--workers N`, a supervisor and N workers (supervisor.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from addons.admin.server import AdminConfigError, check_token_policy
from addons.approvals.auth import ApproverError, Principals
from addons.config.load import LoadedConfig, PolicyError, load_config
from addons.pipeline.identity import AuthConfigError, ProxyAuth
from addons.policy.authority import AuthorityError, split_authority
from addons.proxy import mitm_compat
from addons.proxy.ca import ensure_ca
from addons.proxy.runtime import Prepared, Runtime, WorkerSpec, serve
from addons.proxy.supervisor import run_supervisor, usable_cores
from addons.telemetry.syslog import SyslogConfigError

log = logging.getLogger("portcullis")


class StartupError(Exception):
    """A problem found before listening: printed as one line, exit status 2."""


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    try:
        host, port = split_authority(text, allow_zero=True)
    except AuthorityError as e:
        raise StartupError(f"{what}: {e} (expected HOST:PORT)") from e
    if port is None:
        raise StartupError(f"{what}: {text!r} has no port (expected HOST:PORT)")
    return host.strip("[]"), port


def upstream_bundle(loaded: LoadedConfig, ca_dir: Path) -> str | None:
    """tls.upstream_ca is trusted in addition to the system roots: write one combined bundle."""
    extra = loaded.config.tls.upstream_ca
    if not extra:
        return None
    import certifi

    path = loaded.resolve_path(extra)
    try:
        extra_pem = path.read_text()
    except OSError as e:
        raise StartupError(f"{loaded.path}: tls.upstream_ca: cannot read {path}: {e}") from e
    bundle = ca_dir / "upstream-trust.pem"
    bundle.write_text(Path(certifi.where()).read_text() + "\n" + extra_pem)
    return str(bundle)


def prepare(args: argparse.Namespace) -> Prepared:
    """Everything that can fail before listening. Raises StartupError / PolicyError."""
    if (unsupported := mitm_compat.check_version()) is not None:
        raise StartupError(f"portcullis: {unsupported}")
    loaded = load_config(args.config)
    cfg = loaded.config
    listen = parse_hostport(args.listen or cfg.listen, "listen")
    admin = parse_hostport(args.admin or cfg.admin.listen, "admin.listen")
    token = os.environ.get(cfg.admin.token_env) or None
    try:
        principals = Principals(token, cfg.admin.approvers)
        check_token_policy(admin[0], token if not principals.configured else "approvers", cfg.admin.token_env)
        auth = ProxyAuth(cfg)
    except (AdminConfigError, AuthConfigError, ApproverError) as e:
        raise StartupError(f"{loaded.path}: {e}") from e
    ca_dir = loaded.resolve_path(cfg.tls.ca_dir)
    try:
        ensure_ca(ca_dir)
    except OSError as e:
        raise StartupError(f"{loaded.path}: tls.ca_dir: cannot create the CA in {ca_dir}: {e}") from e
    return Prepared(loaded, listen, admin, token, principals, auth, ca_dir, upstream_bundle(loaded, ca_dir))


def run_command(args: argparse.Namespace) -> int:
    """`portcullis run --config FILE [--listen H:P] [--admin H:P] [--workers N]`."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        p = prepare(args)
    except PolicyError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 2
    except StartupError as e:
        print(str(e), file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{args.config}:1:1: cannot read: {e}", file=sys.stderr)
        return 2
    try:
        if args.worker is not None:
            worker = WorkerSpec(args.worker, args.worker_fd, Path(args.worker_bus))
            return asyncio.run(serve(Runtime(p, worker)))
        workers = args.workers if args.workers is not None else usable_cores()
        if workers > 1:
            return run_supervisor(p, workers, args.config)
        return asyncio.run(serve(Runtime(p)))
    except SyslogConfigError as e:
        print(f"{p.loaded.path}: {e}", file=sys.stderr)
        return 2
