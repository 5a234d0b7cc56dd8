"""`portcullis healthcheck`: ask a running proxy's admin server whether it is alive (or ready).

For container HEALTHCHECKs, where slim images have no curl. Exit 0 healthy, 1 not.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

DEFAULT_ADMIN = "127.0.0.1:9090"


def admin_address(config: Path) -> str:
    """`admin.listen` of a config file as a connectable host:port (a wildcard address becomes loopback).

    Only that key is read: loading the whole policy every few seconds would cost as much as a start."""
    doc = YAML(typ="safe", pure=True).load(config.read_text(encoding="utf-8"))
    admin = doc.get("admin") if isinstance(doc, dict) else None
    listen = admin.get("listen") if isinstance(admin, dict) else None
    if not isinstance(listen, str) or ":" not in listen:
        return DEFAULT_ADMIN
    host, port = listen.rsplit(":", 1)
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - a wildcard listener answers on loopback
        host = "127.0.0.1" if host != "::" else "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def healthcheck_command(args: argparse.Namespace) -> int:
    path = "/readyz" if args.ready else "/healthz"
    if args.url:
        url = args.url.rstrip("/") + path
    else:
        try:
            url = f"http://{admin_address(Path(args.config))}{path}"
        except (OSError, YAMLError, UnicodeDecodeError) as e:
            msg = f"portcullis healthcheck: cannot read {args.config}: {e}".replace("\n", " ")
            print(msg, file=sys.stderr)
            return 1
    # No proxy: HTTP(S)_PROXY in the proxy's own environment must not route its health check.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=args.timeout) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"portcullis healthcheck: {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"portcullis healthcheck: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0
