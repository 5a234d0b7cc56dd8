"""addons/config/credentials.py: credential rules beside `rules:` in a rule file, every error at its
path:line:col (never showing a secret), secrets read from the environment or a file on every load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from addons.config.credentials import default_placeholder
from addons.config.load import PolicyError, load_config, load_policy
from addons.policy.credentials import ApplyKind, CredentialApproval

SECRET = "ghp_0123456789abcdefSECRET"
CLIENTS = [
    {"name": "reviewers", "proxy_auth": {"user": "rev", "password_env": "REV_PW"}},
    {"name": "ci", "cidrs": ["10.1.0.0/16"]},
]


def good(**over: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"name": "gh", "secret": {"file": "secrets/gh"}, "hosts": ["api.github.com"],
                         "apply": {"header": "Authorization", "template": "Bearer {secret}"}}
    c.update(over)
    return c


def setup(tmp: Path, creds: list[dict[str, Any]] | str, secret: str | None = SECRET,
          **config: Any) -> Path:
    (tmp / "rules").mkdir(exist_ok=True)
    (tmp / "secrets").mkdir(exist_ok=True)
    if secret is not None:
        (tmp / "secrets" / "gh").write_text(secret + "\n")
    rules = [{"name": "gh", "action": "allow", "hosts": ["api.github.com"]}]
    text = creds if isinstance(creds, str) else json.dumps({"rules": rules, "credentials": creds}, indent=1)
    (tmp / "rules" / "c.yaml").write_text(text)
    cfg: dict[str, Any] = {"rules": ["rules/"], "default_action": "deny", "approvals": {"persist_to": None},
                           "clients": CLIENTS, "profiles": [{"name": "release"}, {"name": "docs"}]}
    cfg.update(config)
    (tmp / "portcullis.yaml").write_text(json.dumps(cfg))
    return tmp / "portcullis.yaml"


def errors(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as e:
        load_config(path)
    for line in e.value.errors:
        assert SECRET not in line
    return e.value.errors


def test_a_credential_rule_compiles_with_its_secret_and_defaults(tmp_path: Path) -> None:
    policy = load_config(setup(tmp_path, [good()])).policy
    (c,) = policy.credentials.creds
    assert (c.name, c.hosts, c.ports, c.methods, c.paths, c.profiles, c.clients) == (
        "gh", frozenset({"api.github.com"}), frozenset({443}), None, None, None, None)
    assert c.secret.reveal() == SECRET  # the file's trailing newline is not part of it
    assert c.placeholders == (default_placeholder("gh"),) == ("portcullis-credential-gh",)
    assert (c.apply.kind, c.apply.header, c.approval) == (ApplyKind.HEADER, "Authorization",
                                                          CredentialApproval.NONE)
    assert c.source == "file secrets/gh" and c.secret_file == str(tmp_path / "secrets" / "gh")
    assert (c.file, c.line) == ("rules/c.yaml", 12)
    assert policy.credentials.inspects("api.github.com", 443)


def test_every_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GH_TOKEN", "  " + SECRET + "  ")
    full = good(secret={"env": "GH_TOKEN"}, hosts=["API.GitHub.com.", "uploads.github.com"], scheme="https",
                ports=[443, 8443], methods=["get", "POST"], paths=["/repos/acme/*"],
                apply={"basic": {"username": "x-access-token"}}, profiles=["release"], clients=["reviewers"],
                approval="first_use", placeholders=["ghp_placeholder_0001", "another-placeholder"],
                description="the release bot's token")
    (c,) = load_config(setup(tmp_path, [full])).policy.credentials.creds
    assert c.hosts == {"api.github.com", "uploads.github.com"} and c.ports == {443, 8443}
    assert c.methods == {"GET", "POST"} and c.paths == ("/repos/acme/*",)
    assert c.secret.reveal() == SECRET and c.source == "env GH_TOKEN" and c.secret_file is None
    assert (c.apply.kind, c.apply.username) == (ApplyKind.BASIC, "x-access-token")
    assert c.profiles == {"release"} and c.clients == {"reviewers"} and c.client_users == {"rev"}
    assert c.approval is CredentialApproval.FIRST_USE
    assert c.placeholders == ("ghp_placeholder_0001", "another-placeholder")


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"hosts": ["*.github.com"]}, "bound to exact host names, never a wildcard"),
        ({"hosts": ["**.github.com"]}, "never a wildcard"),
        ({"hosts": ["140.82.112.6"]}, "is an IP address"),
        ({"hosts": ["[::1]"]}, "is an IP address"),
        ({"hosts": ["github.io"]}, "a public suffix or a single label"),
        ({"hosts": ["gitea"]}, "a public suffix or a single label"),
        ({"hosts": ["a b.com"]}, "is not a host name"),
        ({"hosts": []}, "at least 1 item"),
        ({"scheme": "http"}, "Input should be 'https'"),
        ({"ports": []}, "at least 1 item"),
        ({"ports": [0]}, "greater than or equal to 1"),
        ({"methods": ["G T"]}, "bad method"),
        ({"methods": ["CONNECT"]}, "bad method"),
        ({"paths": ["repos/*"]}, "starts with '/'"),
        ({"apply": {"header": "Host"}}, "cannot carry a credential"),
        ({"apply": {"header": "Content-Length"}}, "cannot carry a credential"),
        ({"apply": {"header": "Proxy-Authorization"}}, "cannot carry a credential"),
        ({"apply": {"header": "Bad Header"}}, "cannot carry a credential"),
        ({"apply": {"header": "Authorization", "template": "Bearer"}}, "{secret} exactly once"),
        ({"apply": {"header": "Authorization", "template": "{secret}{secret}"}}, "{secret} exactly once"),
        ({"apply": {"header": "Authorization", "template": "{x} {secret}"}}, "no other braces"),
        ({"apply": {"basic": {"username": "a:b"}}}, "cannot contain ':'"),
        ({"apply": {"header": "A", "basic": {"username": "u"}}}, "exactly one of header"),
        ({"apply": {"basic": {"username": "u"}, "template": "x {secret}"}}, "template goes with header"),
        ({"apply": {}}, "exactly one of header"),
        ({"secret": {"env": "A", "file": "b"}}, "exactly one of env and file"),
        ({"secret": {}}, "exactly one of env and file"),
        ({"secret": {"env": "PORTCULLIS_TEST_SURELY_UNSET"}}, "PORTCULLIS_TEST_SURELY_UNSET is not set"),
        ({"secret": {"file": "secrets/none"}}, "secret file secrets/none does not exist"),
        ({"profiles": ["nope"]}, "unknown profile 'nope'"),
        ({"clients": ["nope"]}, "unknown client group 'nope'"),
        ({"clients": ["ci"]}, "has no proxy_auth; a source address is not an identity"),
        ({"approval": "always"}, "Input should be 'none' or 'first_use'"),
        ({"placeholders": ["short"]}, "at least 8 characters"),
        ({"placeholders": [SECRET]}, "the secret equals a placeholder"),
        ({"unknown": 1}, "unknown key 'unknown'"),
        ({"name": "has space"}, "should match pattern"),
    ],
)
def test_a_bad_credential_rule_is_an_error_at_its_position(tmp_path: Path, over: dict[str, Any],
                                                           message: str) -> None:
    errs = errors(setup(tmp_path, [good(**over)]))
    assert any(message in e for e in errs), errs
    assert all(e.startswith(str(tmp_path / "rules" / "c.yaml") + ":") for e in errs), errs


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("", "secret file secrets/gh is empty"),
        ("   \n\n", "is empty"),
        ("short", "fewer than 8 characters"),
        ("abcdefgh\nijklmnop", "holds a control character"),
        ("abc\x00defghijk", "holds a control character"),
    ],
)
def test_an_unusable_secret_is_an_error_that_never_shows_it(tmp_path: Path, secret: str,
                                                             message: str) -> None:
    errs = errors(setup(tmp_path, [good()], secret=secret))
    assert len(errs) == 1 and message in errs[0] and errs[0].split(":")[1:3] == ["14", "14"], errs
    if len(secret.strip()) >= 3:
        assert secret.strip()[:3] not in errs[0].split(": ", 1)[1].replace("secrets/gh", "")


def test_names_and_placeholders_are_unique_across_files(tmp_path: Path) -> None:
    cfg = setup(tmp_path, [good()])
    (tmp_path / "rules" / "d.yaml").write_text(json.dumps({"credentials": [
        good(), good(name="gh2", placeholders=["portcullis-credential-gh"])]}))
    errs = errors(cfg)
    assert any("duplicate credential name 'gh' (first defined at" in e for e in errs), errs
    assert any("placeholder 'portcullis-credential-gh' is already credential 'gh''s" in e for e in errs), errs


def test_tls_inspect_never_cannot_inject(tmp_path: Path) -> None:
    errs = errors(setup(tmp_path, [good()], tls={"inspect": "never"}))
    assert any("injected into inspected TLS only, but tls.inspect is 'never'" in e for e in errs)


def test_credentials_must_be_a_list_of_mappings(tmp_path: Path) -> None:
    assert any("credentials: must be a list" in e for e in errors(setup(tmp_path, "credentials: 3\n")))
    assert any("credentials.0: a credential is a mapping" in e
               for e in errors(setup(tmp_path, "credentials: [x]\n")))


def test_a_file_with_credentials_only_is_a_rule_file(tmp_path: Path) -> None:
    cfg = setup(tmp_path, json.dumps({"credentials": [good()]}))
    policy = load_config(cfg).policy
    assert policy.rule_count == 0 and policy.credentials.names == {"gh"}


def test_secrets_are_read_on_every_load_never_cached_with_the_rule_file(tmp_path: Path) -> None:
    cfg = setup(tmp_path, [good()])
    loaded = load_config(cfg)
    assert loaded.policy.credentials.creds[0].secret.reveal() == SECRET
    (tmp_path / "secrets" / "gh").write_text("ghp_rotated_value_0002\n")  # the rule file is unchanged
    again = load_policy(loaded.config, loaded.base_dir)
    assert again.credentials.creds[0].secret.reveal() == "ghp_rotated_value_0002"
    (tmp_path / "secrets" / "gh").write_text("")  # emptied: the reload is refused whole
    with pytest.raises(PolicyError) as e:
        load_policy(loaded.config, loaded.base_dir)
    assert "is empty" in str(e.value)


def test_without_secrets_the_rules_are_checked_but_no_value_is_read(tmp_path: Path) -> None:
    cfg = setup(tmp_path, [good(secret={"env": "PORTCULLIS_TEST_SURELY_UNSET"})])
    errors(cfg)  # strict: the proxy would not start
    (c,) = load_config(cfg, secrets=False).policy.credentials.creds
    assert c.secret.reveal().startswith("unread-") and c.source == "env PORTCULLIS_TEST_SURELY_UNSET"
    assert any("unknown profile" in e for e in errors(setup(tmp_path, [good(profiles=["nope"])])))
