"""addons/cli.py: the `portcullis` console script: every command parses and dispatches to its module, the
version, usage errors, Ctrl-C and a closed pipe; and the installed script's exit codes."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from addons import __version__, cli
from addons.cli import _HANDLERS, build_parser, main
from tests.policy.pol_helpers import REPO

EXAMPLE = str(REPO / "portcullis.yaml")
EXAMPLE_TESTS = str(REPO / "rules" / "tests.yaml")


def test_every_command_has_a_handler_that_exists() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(_HANDLERS)
    for command, target in _HANDLERS.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), command


@pytest.mark.parametrize(
    ("argv", "command", "fields"),
    [
        (["run", "--config", "c.yaml"], "run", {"listen": None, "admin": None}),
        (["check", "--config", "c.yaml", "https://x/", "--json"], "check", {"method": "GET", "json": True}),
        (["test", "--config", "c.yaml", "cases.yaml"], "test", {"cases": "cases.yaml", "json": False}),
        (
            ["approvals", "allow", "apr-1", "--scope", "session"],
            "approvals",
            {"id": "apr-1", "scope": "session"},
        ),
        (["report", "ev.jsonl", "--since", "1h"], "report", {"format": "auto", "since": "1h"}),
        (["ca"], "ca", {"dir": "certs/"}),
        (["healthcheck", "--ready"], "healthcheck", {"ready": True, "timeout": 3.0}),
    ],
)
def test_arguments(argv: list[str], command: str, fields: dict[str, object]) -> None:
    args = build_parser().parse_args(argv)
    assert args.command == command
    for k, v in fields.items():
        assert getattr(args, k) == v


def _stub(args: argparse.Namespace) -> int:  # each test below puts its own handler here
    raise AssertionError("not replaced")


@pytest.fixture
def handler(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[argparse.Namespace], int]], None]:
    """Route `portcullis ca` to a handler of the test's choosing (through main's own import)."""
    monkeypatch.setattr(cli, "_HANDLERS", {**_HANDLERS, "ca": f"{__name__}:_stub"})

    def use(fn: Callable[[argparse.Namespace], int]) -> None:
        monkeypatch.setattr(sys.modules[__name__], "_stub", fn)

    return use


def test_main_dispatches_and_returns_the_handlers_status(handler: Any) -> None:
    seen: list[argparse.Namespace] = []
    handler(lambda args: seen.append(args) or 7)
    assert main(["ca", "--dir", "x/"]) == 7
    assert seen[0].dir == "x/" and seen[0].command == "ca"


@pytest.mark.parametrize(("error", "code"), [(KeyboardInterrupt(), 130), (BrokenPipeError(), 0)])
def test_ctrl_c_and_a_closed_pipe(handler: Any, error: BaseException, code: int) -> None:
    def raising(args: argparse.Namespace) -> int:
        raise error

    handler(raising)
    assert main(["ca"]) == code


@pytest.mark.parametrize("argv", [[], ["nope"], ["check", "https://x/"], ["approvals", "allow"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "usage: portcullis" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"portcullis {__version__}"


# -- the installed console script -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["validate", "--config", EXAMPLE], 0),
        (["check", "--config", EXAMPLE, "https://pypi.org/simple/"], 0),
        (["check", "--config", EXAMPLE, "https://paste.ee/"], 1),
        (["check", "--config", EXAMPLE, "https://new.example/"], 3),
        (["check", "--config", EXAMPLE, "not-a-url"], 2),
        (["test", "--config", EXAMPLE, EXAMPLE_TESTS], 0),
        (["validate", "--config", "/nonexistent/portcullis.yaml"], 1),
    ],
)
def test_console_script_exit_codes(argv: list[str], code: int) -> None:
    p = subprocess.run(
        [str(REPO / ".venv" / "bin" / "portcullis"), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr
