"""addons/policy/credentials.py: the secret that never shows, bindings (exact host, port, method, path),
who is entitled, the needles (placeholders, the secret, their %- and base64 forms) and the set's index."""

from __future__ import annotations

import base64
import pickle
import re
from urllib.parse import quote

import pytest

from addons.policy.credentials import (
    Apply,
    ApplyKind,
    Credential,
    CredentialSet,
    Injection,
    Secret,
    base64_cores,
    compile_needles,
    needles,
)
from addons.policy.evaluate import compile_paths
from addons.policy.model import Client

VALUE = "ghp_Zq9sEcReT0kEn1234"
PLACEHOLDER = "portcullis-credential-gh"


def cred(name: str = "gh", secret: str = VALUE, placeholders: tuple[str, ...] = (PLACEHOLDER,),
         **kw: object) -> Credential:
    patterns = compile_needles(Secret(secret), placeholders)
    paths = kw.pop("paths", None)
    base: dict[str, object] = {
        "name": name, "file": "rules/c.yaml", "line": 3, "hosts": frozenset({"api.github.com"}),
        "ports": frozenset({443}), "apply": Apply(ApplyKind.HEADER, "Authorization", "Bearer {secret}"),
        "secret": Secret(secret), "placeholders": placeholders, "needles": patterns,
        "paths": tuple(paths) if paths else None,  # type: ignore[call-overload]
        "_path_re": compile_paths(paths) if paths else None,  # type: ignore[arg-type]
    }
    base.update(kw)
    return Credential(**base)  # type: ignore[arg-type]


# -- the secret ----------------------------------------------------------------------------------------


def test_a_secret_never_shows_itself() -> None:
    s = Secret(VALUE)
    inj = Injection("gh", "Authorization", s)
    c = cred()
    for text in (repr(s), str(s), f"{s}", f"{s!r}", repr(inj), repr(c), str(c), repr([c, inj])):
        assert VALUE not in text
    assert s.reveal() == VALUE
    assert s == Secret(VALUE) and s != Secret(VALUE + "x") and s != VALUE
    with pytest.raises(TypeError):
        pickle.dumps(s)


@pytest.mark.parametrize(
    ("apply", "want"),
    [
        (Apply(ApplyKind.HEADER, "Authorization", "Bearer {secret}"), f"Bearer {VALUE}"),
        (Apply(ApplyKind.HEADER, "X-Api-Key", "{secret}"), VALUE),
        (Apply(ApplyKind.HEADER, "PRIVATE-TOKEN", "token={secret};v=1"), f"token={VALUE};v=1"),
        (Apply(ApplyKind.BASIC, "Authorization", username="x-access-token"),
         "Basic " + base64.b64encode(f"x-access-token:{VALUE}".encode()).decode()),
    ],
)
def test_apply_renders_the_header_value(apply: Apply, want: str) -> None:
    assert apply.render(Secret(VALUE)).reveal() == want


# -- needles -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "u:", "us:", "use:", "x-access-token:", "a" * 17 + ":"])
@pytest.mark.parametrize("suffix", ["", "x", "xy", "@host"])
def test_a_base64_core_is_in_every_encoding_of_a_string_holding_the_value(prefix: str, suffix: str) -> None:
    encoded = base64.b64encode(f"{prefix}{VALUE}{suffix}".encode())
    assert any(core in encoded for core in base64_cores(VALUE.encode()))


def test_base64_cores_are_long_enough_to_mean_something() -> None:
    assert all(len(c) >= 8 for c in base64_cores(b"12345678"))
    assert base64_cores(b"ab") == []  # too short to tell apart from anything


@pytest.mark.parametrize(
    "carrier",
    [
        f"Bearer {VALUE}",
        f"/x?token={VALUE}",
        f"/x?token={quote(VALUE, safe='')}",
        f"q={PLACEHOLDER}&z=1",
        "Basic " + base64.b64encode(f"user:{PLACEHOLDER}".encode()).decode(),
        "Basic " + base64.b64encode(f"x-access-token:{VALUE}".encode()).decode(),
        base64.urlsafe_b64encode(f"??>{VALUE}".encode()).decode(),
        f"{VALUE}.evil.example",
    ],
)
def test_every_form_of_a_needle_is_found_in_text_and_bytes(carrier: str) -> None:
    c = cred()
    assert c.carried_in(carrier)
    assert c.carried_in_bytes(carrier.encode())


@pytest.mark.parametrize(
    "innocent",
    ["", "Bearer ghp_other", "/repos/acme/web", "portcullis-credential-g", PLACEHOLDER[:-1],
     VALUE[:-1], "Basic " + base64.b64encode(b"user:password").decode()],
)
def test_near_misses_are_not_needles(innocent: str) -> None:
    c = cred()
    assert not c.carried_in(innocent)
    assert not c.carried_in_bytes(innocent.encode())


def test_needles_longest_first_and_the_longest_counted() -> None:
    found = needles(Secret(VALUE), (PLACEHOLDER,))
    assert found == sorted(found, key=lambda s: (-len(s), s)) and VALUE in found and PLACEHOLDER in found
    assert cred().longest_needle == max(len(n) for n in found)
    assert all(re.escape(n) for n in found)


# -- bindings and entitlement --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "method", "path", "bound"),
    [
        ("api.github.com", 443, "GET", "/repos/acme/web", True),
        ("api.github.com", 443, "post", "/repos/acme/web/pulls", True),
        ("api.github.com", 443, "DELETE", "/repos/acme/web", False),  # method not bound
        ("api.github.com", 443, "GET", "/user", False),  # path not bound
        ("api.github.com", 8443, "GET", "/repos/acme/web", False),  # port not bound
        ("github.com", 443, "GET", "/repos/acme/web", False),  # another host
        ("evil.api.github.com", 443, "GET", "/repos/acme/web", False),  # exact names only
        ("api.github.com.evil.test", 443, "GET", "/repos/acme/web", False),
    ],
)
def test_a_binding_is_exact(host: str, port: int, method: str, path: str, bound: bool) -> None:
    c = cred(methods=frozenset({"GET", "POST"}), paths=["/repos/acme/*"])
    assert c.binds(host, port, method, (path, path)) is bound


def test_a_path_binding_needs_both_readings_of_the_path() -> None:
    c = cred(paths=["/repos/acme/*"])
    assert c.binds("api.github.com", 443, "GET", ("/repos/acme/x", "/repos/acme/x"))
    # `/repos/acme%2F..%2F../admin` decodes elsewhere: a credential is applied only if both forms match
    assert not c.binds("api.github.com", 443, "GET", ("/repos/acme/%2F..%2Fother", "/repos/other"))


TASK_RELEASE = Client("10.0.0.1", 1, "t1", task_id="t1", profile="release")
TASK_FRONTEND = Client("10.0.0.1", 1, "t2", task_id="t2", profile="frontend")
TASK_NO_PROFILE = Client("10.0.0.1", 1, "t3", task_id="t3")
PROXY_USER = Client("10.0.0.1", 1, "reviewer")
ANONYMOUS = Client("10.0.0.1", 1)


@pytest.mark.parametrize(
    ("profiles", "clients", "client", "entitled"),
    [
        (None, None, TASK_RELEASE, True),  # no limits: any authenticated client
        (None, None, PROXY_USER, True),
        (None, None, ANONYMOUS, False),  # never an unauthenticated one
        ({"release"}, None, TASK_RELEASE, True),
        ({"release"}, None, TASK_FRONTEND, False),
        ({"release"}, None, TASK_NO_PROFILE, False),
        ({"release"}, None, PROXY_USER, False),
        (None, {"reviewers"}, PROXY_USER, True),
        (None, {"reviewers"}, TASK_RELEASE, False),
        (None, {"reviewers"}, ANONYMOUS, False),
        ({"release"}, {"reviewers"}, TASK_RELEASE, True),  # either names it
        ({"release"}, {"reviewers"}, PROXY_USER, True),
        ({"release"}, {"reviewers"}, TASK_FRONTEND, False),
    ],
)
def test_only_authenticated_entitled_clients_get_it(
    profiles: set[str] | None, clients: set[str] | None, client: Client, entitled: bool
) -> None:
    c = cred(profiles=frozenset(profiles) if profiles is not None else None,
             clients=frozenset(clients) if clients is not None else None,
             client_users=frozenset({"reviewer"}) if clients else frozenset())
    why = c.refusal(client)
    assert (why is None) is entitled
    if not entitled:
        assert why and VALUE not in why


# -- the set -------------------------------------------------------------------------------------------


def test_the_set_indexes_hosts_and_ports_and_finds_leaks_but_the_applied_one() -> None:
    gh = cred()
    pypi = cred("pypi", "pypi-AgEIcHlwaS5vcmcXYZ", ("portcullis-credential-pypi",),
                hosts=frozenset({"pypi.corp.example"}), ports=frozenset({443, 8443}))
    s = CredentialSet([gh, pypi])
    assert bool(s) and len(s) == 2 and s.names == {"gh", "pypi"} and s.get("pypi") is pypi
    assert s.inspects("api.github.com", 443) and s.inspects("pypi.corp.example", 8443)
    assert not s.inspects("api.github.com", 8443) and not s.inspects("github.com", 443)
    assert s.bound("api.github.com", 443, "GET", ("/", "/")) == [gh]
    assert s.leaked([f"x: {VALUE}"]) is gh
    assert s.leaked([f"x: {PLACEHOLDER}"], skip="gh") is None  # its placeholder, where it is applied ...
    assert s.leaked([f"x: {VALUE}"], skip="gh") is gh  # ... but never its value from the agent
    assert s.redact(f"/a/{VALUE}/b?{PLACEHOLDER.upper()}") == "/a/[credential:gh]/b?[credential:gh]"
    assert s.leaked(["portcullis-credential-pypi"], skip="gh") is pypi
    assert s.leaked(["nothing here", ""]) is None
    assert s.body_watch("gh") == (pypi,) and s.body_watch(None) == (gh, pypi)
    assert not CredentialSet() and CredentialSet().leaked(["anything"]) is None
