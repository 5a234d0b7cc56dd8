"""`portcullis` console script: argument parsing and dispatch. Each command lives with its part."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import cast

from addons import __version__, envcmd
from addons.credentials import cli as credentials_cli

# command -> "module:function"; the function takes the parsed namespace and returns the exit status.
_HANDLERS = {
    "run": "addons.proxy.launcher:run_command",
    "validate": "addons.rulecli:validate_command",
    "check": "addons.rulecli:check_command",
    "test": "addons.rulecli:test_command",
    "approvals": "addons.approvals.cli:approvals_command",
    "credentials": "addons.credentials.cli:credentials_command",
    "webhook-verify": "addons.approvals.cli:webhook_verify_command",
    "report": "addons.telemetry.report:report_command",
    "ca": "addons.proxy.ca:ca_command",
    "env": "addons.envcmd:env_command",
    "healthcheck": "addons.healthcheck:healthcheck_command",
}


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers from 1 to 256")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="portcullis", description="Egress-filtering proxy for AI agents.")
    p.add_argument("--version", action="version", version=f"portcullis {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the proxy and the admin server")
    run.add_argument("--config", required=True, help="config file (YAML)")
    run.add_argument("--listen", metavar="H:P", help="proxy address (overrides the config)")
    run.add_argument("--admin", metavar="H:P", help="admin address (overrides the config)")
    run.add_argument("--workers", type=_positive, metavar="N",
                     help="proxy processes sharing the listen address (default: the usable cores)")
    # Set by the supervisor for its workers only.
    run.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    run.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    run.add_argument("--worker-bus", help=argparse.SUPPRESS)

    val = sub.add_parser("validate", help="check the config and every rule file")
    val.add_argument("--config", required=True)
    val.add_argument("--no-secrets", action="store_true",
                     help="check credential rules without reading their secrets (CI without the values)")

    chk = sub.add_parser("check", help="what would the policy do with this URL?")
    chk.add_argument("--config", required=True)
    chk.add_argument("url")
    chk.add_argument("--method", default="GET")
    chk.add_argument("--client", metavar="ADDR", help="client address or client group name")
    chk.add_argument("--profile", metavar="NAME", help="judge as a task of this profile")
    chk.add_argument("--json", action="store_true", help="machine-readable output")

    tst = sub.add_parser("test", help="run policy unit tests from a YAML file of cases")
    tst.add_argument("--config", required=True)
    tst.add_argument("cases")
    tst.add_argument("--json", action="store_true", help="machine-readable output")

    credentials_cli.add_parser(sub)

    apr = sub.add_parser("approvals", help="list or decide approvals on a running proxy")
    apr.add_argument("--admin", metavar="URL", help="admin base URL (default: from --config, else http://127.0.0.1:9090)")
    apr.add_argument("--config", help="config file, for the admin address, the token variable and "
                     "state/admin-token next to it (default: portcullis.yaml when it exists)")
    apr.add_argument("--json", action="store_true")
    apr_sub = apr.add_subparsers(dest="action", required=True, metavar="ACTION")
    apr_sub.add_parser("list", help="pending and recent approvals")
    for verb in ("allow", "deny"):
        v = apr_sub.add_parser(verb, help=f"{verb} a pending approval")
        v.add_argument("id")
        v.add_argument("--scope", choices=["once", "session", "task", "always"], default="once")
        v.add_argument("--by", help="who decides (default: $USER)")
        v.add_argument("--reason", default="")

    wv = sub.add_parser("webhook-verify", help="verify a Standard Webhooks signature (for receivers)")
    wv.add_argument("--secret-env", default="PORTCULLIS_WEBHOOK_SECRET",
                    help="variable holding the whsec_ secret")
    wv.add_argument("--id", required=True, dest="msg_id", help="the webhook-id header")
    wv.add_argument("--timestamp", required=True, help="the webhook-timestamp header")
    wv.add_argument("--signature", required=True, help="the webhook-signature header")
    wv.add_argument("--tolerance", type=int, default=300, help="seconds of clock skew accepted")
    wv.add_argument("body", nargs="?", default="-", help="file with the raw body (default: stdin)")

    rep = sub.add_parser("report", help="what was denied or held, with rules to paste")
    rep.add_argument("events", help="events file (JSON lines)")
    rep.add_argument("--since", help="only events newer than this (e.g. 1h, 30m)")
    rep.add_argument("--format", choices=["auto", "table", "markdown", "json"], default="auto")
    rep.add_argument("--by", choices=["domain", "task"], default="domain",
                     help="group by registrable domain (default) or by agent task")
    rep.add_argument("--config", help="also list the credentials this config defines that were never used")

    ca = sub.add_parser("ca", help="create the CA if missing; print the public certificate path")
    ca.add_argument("--dir", default="certs/", help="CA directory (default: certs/)")

    envcmd.add_parser(sub)

    hc = sub.add_parser("healthcheck", help="is a running proxy alive? (for container health checks)")
    hc.add_argument("--config", default="/app/portcullis.yaml",
                    help="config file, to find admin.listen (default: /app/portcullis.yaml)")
    hc.add_argument("--url", help="admin base URL instead (e.g. http://127.0.0.1:9090)")
    hc.add_argument("--ready", action="store_true",
                    help="ask /readyz (serving with a policy) instead of /healthz")
    hc.add_argument("--timeout", type=float, default=3.0, help="seconds (default: 3)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = _HANDLERS[args.command].split(":")
    module = importlib.import_module(module_name)
    handler = cast(Callable[[argparse.Namespace], int], getattr(module, func_name))
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
