"""The interception CA: created on first use in tls.ca_dir, private key readable only by its owner."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mitmproxy import certs

BASENAME = "mitmproxy"  # mitmproxy's confdir naming; TlsConfig reads these files from confdir
KEY_SIZE = 2048
# Files that carry the private key; everything else in the folder is public.
SECRET_FILES = (f"{BASENAME}-ca.pem", f"{BASENAME}-ca.p12")


def public_cert_path(ca_dir: Path) -> Path:
    return ca_dir / f"{BASENAME}-ca-cert.pem"


def ensure_ca(ca_dir: Path) -> Path:
    """Create the CA in `ca_dir` if it is missing; tighten permissions; return the public cert path.

    A PermissionError says what to do when the folder belongs to another user (a host folder
    mounted into the container, which runs as its own uid)."""
    try:
        return _ensure_ca(ca_dir)
    except PermissionError as e:
        where = f": {str(e.filename)!r}" if e.filename else ""
        raise PermissionError(e.errno, f"{e.strerror}{where}{_ownership_hint(ca_dir)}") from e


def _ownership_hint(ca_dir: Path) -> str:
    uid = os.getuid()
    try:
        owner = ca_dir.stat().st_uid
    except OSError:
        return ""
    if owner == uid:
        return ""
    return (f" (the folder belongs to uid {owner}, this process runs as uid {uid}: give it to uid {uid}, "
            f"e.g. 'chown -R {uid} <host folder>', or mount a named volume there instead)")


def _ensure_ca(ca_dir: Path) -> Path:
    ca_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(ca_dir, 0o700)
    if not (ca_dir / f"{BASENAME}-ca.pem").exists():
        certs.CertStore.create_store(
            ca_dir, BASENAME, KEY_SIZE, organization="Portcullis", cn="Portcullis CA"
        )
    for name in SECRET_FILES:
        p = ca_dir / name
        if p.exists():
            os.chmod(p, 0o600)
    return public_cert_path(ca_dir)


def ca_command(args: argparse.Namespace) -> int:
    """`portcullis ca [--dir certs/]`: create the CA if missing, print the public certificate path."""
    try:
        path = ensure_ca(Path(args.dir))
    except OSError as e:
        print(f"portcullis ca: cannot create the CA in {args.dir}: {e}", file=sys.stderr)
        return 1
    print(path.resolve())
    return 0
