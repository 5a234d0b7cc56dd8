"""addons/rulecli.py: `portcullis validate | check | test`: output, JSON and exit codes (the console script
itself: tests/test_cli.py; `check`'s pipeline run: tests/test_check.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from addons.cli import main
from tests.policy.pol_helpers import REPO, write_config

EXAMPLE = str(REPO / "portcullis.yaml")
EXAMPLE_TESTS = str(REPO / "rules" / "tests.yaml")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- validate ---------------------------------------------------------------------------------------


def test_validate_example(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "validate", "--config", EXAMPLE)
    assert code == 0 and err == ""
    assert f"{EXAMPLE}: valid" in out
    assert "rules: 15 (allow 9, deny 5, approval 1)" in out
    assert "skipped (policy-test file): rules/tests.yaml" in out


def test_validate_shows_normalised_forms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(
        tmp_path, "rules:\n  - name: idn\n    action: allow\n    hosts: [Bücher.de, pypi.org]\n"
    )
    code, out, _ = run(capsys, "validate", "--config", str(cfg))
    assert code == 0
    assert "normalised: 'Bücher.de' -> xn--bcher-kva.de (rules/r.yaml:2, rule idn)" in out
    assert "'pypi.org'" not in out


def test_validate_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, "rules:\n  - {name: a, action: allow, hosts: ['*.com', 'x.*.y']}\n")
    code, out, err = run(capsys, "validate", "--config", str(cfg))
    assert code == 1 and out == ""
    r = tmp_path / "rules" / "r.yaml"
    lines = err.splitlines()
    assert lines[0].startswith(f"{r}:2:38: rule 'a': wildcard '*.com' stands directly over the public suffix")
    assert lines[1].startswith(f"{r}:2:47: rule 'a': bad wildcard 'x.*.y'")
    assert lines[2] == f"{cfg}: invalid (2 errors)"


def test_validate_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "validate", "--config", str(tmp_path / "none.yaml"))
    assert code == 1 and out == ""
    assert err.splitlines()[0] == f"{tmp_path / 'none.yaml'}: cannot read: no such file"
    assert "Traceback" not in err


# -- check ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code", "decision", "rule"),
    [
        (["https://pypi.org/simple/"], 0, "allow", "python-packages"),
        (["https://pastebin.com/raw/x"], 1, "deny", "paste-sites"),
        (["https://unknown.example/"], 3, "approval", None),
        (["https://api.github.com/repos/o/r/pulls", "--method", "POST"], 3, "approval", "github-api-writes"),
        (["https://api.github.com/repos/o/r/pulls"], 0, "allow", "github-read"),
        (["https://api.github.com/gists", "--method", "post"], 1, "deny", "gist-writes"),
        (["http://169.254.169.254/latest/meta-data/"], 1, "deny", None),
        (["http://[::ffff:a9fe:a9fe]/"], 1, "deny", None),
    ],
)
def test_check_exit_codes_and_json(
    capsys: pytest.CaptureFixture[str], argv: list[str], code: int, decision: str, rule: str | None
) -> None:
    got, out, err = run(capsys, "check", "--config", EXAMPLE, *argv, "--json")
    assert (got, err) == (code, "")
    doc = json.loads(out)
    assert doc["decision"] == decision
    assert (doc["rule"]["name"] if doc["rule"] else None) == rule
    assert doc["dns_queried"] is False
    assert set(doc) >= {
        "url",
        "method",
        "client",
        "addresses",
        "reason",
        "matched",
        "detail",
        "tunnel",
        "request",
    }


def test_check_human_output_explains(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "check", "--config", EXAMPLE, "https://api.github.com/repos/o/r/pulls", "--method", "POST"
    )
    assert code == 3
    assert "CONNECT (tunnel): ALLOW  (reason: inspect)" in out
    assert "POST /repos/o/r/pulls (inspected request): APPROVAL  (reason: rule)" in out
    assert "decided by: github-api-writes (approval, rules/source-hosting.yaml:" in out
    assert "also matched: github-read (allow, rules/source-hosting.yaml:" in out
    assert "check does not query DNS" in out
    assert out.rstrip().splitlines()[-2] == "=> APPROVAL"


def test_check_uses_network_resolve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(
        tmp_path,
        [{"name": "a", "action": "allow", "hosts": ["a.test", "b.test"]}],
        network={"resolve": {"a.test": "10.0.0.5", "b.test": "8.8.8.8"}},
    )
    code, out, _ = run(capsys, "check", "--config", str(cfg), "https://a.test/")
    assert code == 1 and "private destination (private)" in out and "10.0.0.5" in out
    code, out, _ = run(capsys, "check", "--config", str(cfg), "https://b.test/")
    assert code == 0 and "addresses from network.resolve: 8.8.8.8" in out and "does not query DNS" not in out


def test_check_clients(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(
        tmp_path,
        [{"name": "ci", "action": "allow", "hosts": ["a.test"], "clients": ["ci"]}],
        clients=[
            {"name": "ci", "cidrs": ["10.0.1.0/24"]},
            {"name": "rev", "proxy_auth": {"user": "r", "password_env": "X"}},
        ],
    )
    assert run(capsys, "check", "--config", str(cfg), "https://a.test/", "--client", "10.0.1.7")[0] == 0
    assert run(capsys, "check", "--config", str(cfg), "https://a.test/", "--client", "ci")[0] == 0
    assert run(capsys, "check", "--config", str(cfg), "https://a.test/", "--client", "rev")[0] == 1
    assert run(capsys, "check", "--config", str(cfg), "https://a.test/")[0] == 1
    code, out, err = run(capsys, "check", "--config", str(cfg), "https://a.test/", "--client", "nobody")
    assert code == 2 and out == "" and err.count("\n") == 1 and "unknown client 'nobody'" in err


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("pypi.org", "use a full http:// or https:// URL"),
        ("ftp://pypi.org/", "use a full http:// or https:// URL"),
        ("https://user:pw@pypi.org/", "credentials in URLs"),
        ("https://pypi.org:0/", "bad port"),
        ("https://pypi.org:99999/", "bad port"),
        ("https://pypi.org:x/", "bad port"),
        ("https://exa mple.com/", "not a host name"),
        ("https://a..b/", "empty label"),
        ("https://[::1/", "unclosed"),
        ("https:///path", "empty host"),
        ("https://1.2.3.4.5/", "more than four parts"),
    ],
)
def test_check_bad_url(capsys: pytest.CaptureFixture[str], url: str, message: str) -> None:
    code, out, err = run(capsys, "check", "--config", EXAMPLE, url)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_check_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, "rules: [{name: a, action: allow, hosts: ['*']}]\n")
    code, out, err = run(capsys, "check", "--config", str(cfg), "https://a.test/")
    assert code == 2 and out == "" and f"{tmp_path / 'rules' / 'r.yaml'}:1:" in err


# -- test -------------------------------------------------------------------------------------------


def test_example_policy_tests_pass(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "test", "--config", EXAMPLE, EXAMPLE_TESTS)
    assert code == 0
    assert out.rstrip().endswith("33 passed, 0 failed")
    assert "FAIL" not in out


def test_failing_case_explains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "cases:\n"
        "  - url: https://pypi.org/\n    expect: allow\n"
        "  - url: https://pastebin.com/\n    expect: allow\n"
        "  - {url: 'https://pypi.org/', expect: allow, rule: npm-registry}\n"
        "  - {url: 'not a url', expect: deny}\n"
    )
    code, out, _ = run(capsys, "test", "--config", EXAMPLE, str(cases))
    assert code == 1
    assert f"PASS {cases}:2: GET https://pypi.org/ -> allow" in out
    assert f"FAIL {cases}:4: GET https://pastebin.com/" in out
    assert "  expected: allow" in out
    assert "  actual:   deny (reason rule), decided by paste-sites (deny, rules/deny.yaml:4)" in out
    assert f"FAIL {cases}:6:" in out and "expected rule 'npm-registry'" not in out  # shown as expected/actual
    assert "  expected: allow, rule npm-registry" in out
    assert f"FAIL {cases}:7: GET not a url" in out and "error: bad URL" in out
    assert out.rstrip().endswith("1 passed, 3 failed")


def test_cases_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text("cases: [{url: 'https://pypi.org/', expect: deny}]\n")
    code, out, _ = run(capsys, "test", "--config", EXAMPLE, str(cases), "--json")
    doc = json.loads(out)
    assert code == 1 and (doc["passed"], doc["failed"]) == (0, 1)
    assert doc["results"][0]["problems"] == ["expected deny, got allow"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "cases:\n  - url: https://pypi.org/\n    expect: allow\n    methd: GET\n",
            ":4:5: unknown key 'methd' in cases.0",
        ),
        ("cases:\n  - url: https://pypi.org/\n    expect: maybe\n", ":3:13: cases.0.expect: Input should be"),
        ("cases:\n  - url: https://pypi.org/\n", ":2:5: cases.0.expect: required key is missing"),
        ("cases: []\n", ":1:8: cases: List should have at least 1 item"),
        ("cases: [\n", ":2:1: while parsing a flow"),
        ("- url: x\n", ":1:1: a policy-test file is a mapping with a 'cases:' list"),
    ],
)
def test_bad_cases_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, error: str) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(text)
    code, out, err = run(capsys, "test", "--config", EXAMPLE, str(cases))
    assert code == 2 and out == ""
    assert err.startswith(f"{cases}{error}"), err


def test_missing_cases_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "test", "--config", EXAMPLE, str(tmp_path / "x.yaml"))
    assert code == 2 and err == f"{tmp_path / 'x.yaml'}: cannot read: no such file\n"


CRED_SECRET = "ghp_validate_never_prints_0123"


def _creds(tmp_path: Path, **over: object) -> Path:
    cred = {"name": "gh", "secret": {"file": "gh.secret"}, "hosts": ["api.github.com"], "methods": ["GET"],
            "paths": ["/repos/*"], "apply": {"header": "Authorization", "template": "Bearer {secret}"},
            "clients": ["rev"], **over}
    (tmp_path / "gh.secret").write_text(CRED_SECRET)
    text = json.dumps({"rules": [{"name": "gh-api", "action": "allow", "hosts": ["api.github.com"]}],
                       "credentials": [cred]})
    return write_config(tmp_path, text, clients=[{"name": "rev", "proxy_auth": {"user": "rev",
                                                                                "password_env": "REV_PW"}}])


def test_validate_lists_credentials_never_their_secret(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "validate", "--config", str(_creds(tmp_path)))
    assert code == 0 and "credentials: 1" in out
    assert "gh (rules/r.yaml:1): https://api.github.com:443 GET /repos/* -> Authorization (file gh.secret); "\
           "for client groups rev" in out
    assert CRED_SECRET not in out + err
    (tmp_path / "gh.secret").unlink()
    code, out, err = run(capsys, "validate", "--config", str(tmp_path / "portcullis.yaml"))
    assert code == 1 and "secret file gh.secret does not exist" in err
    code, out, err = run(capsys, "validate", "--no-secrets", "--config", str(tmp_path / "portcullis.yaml"))
    assert code == 0 and "(secrets not read: --no-secrets)" in out


def test_validate_refuses_a_credential_without_exact_hosts(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "validate", "--config", str(_creds(tmp_path, hosts=["*.github.com"])))
    assert code == 1 and "bound to exact host names, never a wildcard" in err and "r.yaml:1:" in err
    no_ports = _creds(tmp_path, hosts=["api.github.com"], ports=[])
    code, _, err = run(capsys, "validate", "--config", str(no_ports))
    assert code == 1 and "ports" in err


def test_validate_notes_a_credential_no_rule_lets_through(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "validate", "--config", str(_creds(tmp_path, hosts=["uploads.github.com"])))
    assert code == 0 and "note: uploads.github.com:443 is denied (default)" in out


def test_check_shows_the_credential_a_url_gets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(_creds(tmp_path))
    (tmp_path / "gh.secret").unlink()  # check never needs the value
    url = "https://api.github.com/repos/a/b"
    code, out, _ = run(capsys, "check", "--config", cfg, url, "--client", "rev")
    assert code == 0 and "credential: gh is applied (Authorization, secret from file gh.secret; for client " \
                         "groups rev)" in out
    code, out, _ = run(capsys, "check", "--config", cfg, "https://api.github.com/repos/a/b")
    assert code == 0
    assert "credential: gh is bound here (for client groups rev) but not applied: the client is not " \
           "authenticated" in out
    code, out, _ = run(capsys, "check", "--config", cfg, "https://api.github.com/user", "--client", "rev")
    assert code == 0 and "credential:" not in out
