"""addons/admin/client.py: where the console commands find the admin API and its token, and how one
call's failures read; against a real HTTP server on loopback."""

from __future__ import annotations

import argparse
import http.server
import json
import os
import threading
from collections.abc import Iterator

import pytest

from addons.admin import client
from addons.admin.client import AdminClientError, call, target, token

LISTEN = "admin: {listen: '127.0.0.1:7000', "
DEFAULT_ENV = "PORTCULLIS_ADMIN_TOKEN"


def ns(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"admin": None, "config": None, **kw})


@pytest.mark.parametrize(
    ("config", "admin", "expect_base", "expect_env"),
    [
        (None, None, "http://127.0.0.1:9090", DEFAULT_ENV),
        (LISTEN + "token_env: MY_TOKEN}\n", None, "http://127.0.0.1:7000", "MY_TOKEN"),
        (LISTEN + "}\n", "127.0.0.9:1/", "http://127.0.0.9:1", DEFAULT_ENV),
        (LISTEN + "}\n", "https://admin.example", "https://admin.example", DEFAULT_ENV),
        ("just a string\n", None, "http://127.0.0.1:9090", DEFAULT_ENV),
    ],
    ids=["defaults", "from-config", "flag-over-config", "flag-with-scheme", "config-without-admin"],
)
def test_where_the_admin_api_is(tmp_path, monkeypatch, config, admin, expect_base, expect_env):
    monkeypatch.chdir(tmp_path)
    path = None
    if config is not None:
        path = tmp_path / "p.yaml"
        path.write_text(config)
    base, env, cfg = target(ns(admin=admin, config=str(path) if path else None))
    assert (base, env, cfg) == (expect_base, expect_env, path)


def test_an_unreadable_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("admin: [unclosed\n")
    with pytest.raises(AdminClientError, match="cannot read"):
        target(ns(config=str(bad)))
    with pytest.raises(AdminClientError, match="cannot read"):
        target(ns(config=str(tmp_path / "missing.yaml")))


def test_the_token_comes_from_the_variable_then_the_file_dev_run_writes(tmp_path, monkeypatch):
    cfg = tmp_path / "portcullis.yaml"
    monkeypatch.delenv("T_ENV", raising=False)
    assert token("T_ENV", cfg) == ("", f"$T_ENV (unset; no {tmp_path / client.TOKEN_FILE} either)")
    f = tmp_path / client.TOKEN_FILE
    f.parent.mkdir()
    f.write_text("from-file\n")
    f.chmod(0o600)
    assert token("T_ENV", cfg) == ("from-file", str(f))
    monkeypatch.setenv("T_ENV", "from-env")
    assert token("T_ENV", cfg) == ("from-env", "$T_ENV")


@pytest.mark.parametrize(("mode", "content", "message"), [
    (0o644, "secret", "open to other users"),
    (0o600, "  \n", "is empty"),
])
def test_a_token_file_that_is_not_private_or_is_empty_is_refused(tmp_path, monkeypatch, mode, content,
                                                                  message):
    monkeypatch.delenv("T_ENV", raising=False)
    f = tmp_path / client.TOKEN_FILE
    f.parent.mkdir()
    f.write_text(content)
    f.chmod(mode)
    with pytest.raises(AdminClientError, match=message):
        token("T_ENV", tmp_path / "portcullis.yaml")


def test_a_token_file_that_is_a_symlink_is_not_followed(tmp_path, monkeypatch):
    monkeypatch.delenv("T_ENV", raising=False)
    real = tmp_path / "elsewhere"
    real.write_text("secret")
    real.chmod(0o600)
    f = tmp_path / client.TOKEN_FILE
    f.parent.mkdir()
    os.symlink(real, f)
    with pytest.raises(AdminClientError, match="cannot read the admin token"):
        token("T_ENV", tmp_path / "portcullis.yaml")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.headers.get("Authorization") != "Bearer right":
            self._send(401, b'{"message": "bad token"}')
        elif self.path == "/text":
            self._send(500, b"plain failure")
        else:
            self._send(200, json.dumps({"path": self.path}).encode())

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_one_call_answers_or_says_why_not(server, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # no ./portcullis.yaml
    monkeypatch.setenv("PORTCULLIS_ADMIN_TOKEN", "right")
    answer = call("prog", ns(admin=server), lambda c: c.get("/x"))
    assert (answer.code, answer.doc) == (0, {"path": "/x"})
    assert capsys.readouterr().err == ""

    answer = call("prog", ns(admin=server), lambda c: c.get("/text"))
    assert (answer.code, answer.doc) == (1, {"message": "plain failure"})
    assert capsys.readouterr().err == "prog: refused, HTTP 500: plain failure\n"

    monkeypatch.setenv("PORTCULLIS_ADMIN_TOKEN", "wrong")
    answer = call("prog", ns(admin=server), lambda c: c.get("/x"))
    assert answer.code == 1
    err = capsys.readouterr().err
    assert err == f"prog: refused, HTTP 401: bad token (check the token in ${DEFAULT_ENV})\n"

    assert call("prog", ns(admin=server), lambda c: c.get("/x"), ok=(401,)).code == 0


def test_an_unreachable_admin_api_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    port = srv.server_address[1]
    srv.server_close()  # a port nobody listens on
    answer = call("prog", ns(admin=f"127.0.0.1:{port}"), lambda c: c.get("/x"))
    assert (answer.code, answer.doc) == (1, None)
    err = capsys.readouterr().err
    assert err.startswith(f"prog: cannot reach the admin API at http://127.0.0.1:{port}: ")
    assert err.count("\n") == 1


def test_a_bad_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "p.yaml"
    bad.write_text("admin: [unclosed\n")
    assert call("prog", ns(config=str(bad)), lambda c: c.get("/x")) == client.Answer(1, None)
    assert capsys.readouterr().err.startswith(f"prog: cannot read {bad}")

