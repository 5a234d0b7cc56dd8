"""Credential injection end to end: a real proxy, curl as the agent (holding no secret), loopback TLS
upstreams that record every header they receive. The secret arrives only at the bound host, method and
path; never over plain HTTP, never to another allowed host, never after a redirect, never when the policy
denies; the agent's own header is replaced; a placeholder or the secret sent anywhere else is refused
(credential_leak); a first use can wait for a person; rotating a secret file takes effect on reload."""

from __future__ import annotations

import json
import os
import secrets
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import PortcullisProc, assert_denied, base_config
from tests.proxy.e2e.inject_support import Recorder

pytestmark = pytest.mark.e2e
GH = "ghp_" + secrets.token_hex(18)
PUB = "pub-key-" + secrets.token_hex(16)
FIRST = "first-use-" + secrets.token_hex(16)
PW = "agent-pw-" + secrets.token_hex(8)
ADMIN = "inject-admin-" + secrets.token_hex(8)
PH = "portcullis-credential-gh"
AGENT = ("--proxy-user", f"agent:{PW}")
ENV = {"GH_TOKEN": GH, "FIRST_TOKEN": FIRST, "AGENT_PW": PW, "PORTCULLIS_TEST_ADMIN_TOKEN": ADMIN}


def rules(rec: Recorder) -> dict[str, Any]:
    return {
        "rules": [
            {
                "name": "hosts",
                "action": "allow",
                "hosts": ["api.public.test", "www.public.test", "public.test", "other.test"],
            },
            {
                "name": "no-denied",
                "action": "deny",
                "hosts": ["api.public.test"],
                "paths": ["/repos/denied/*"],
            },
        ],
        "credentials": [
            {
                "name": "gh",
                "secret": {"env": "GH_TOKEN"},
                "hosts": ["api.public.test"],
                "ports": [rec.tls_port, rec.http_port],
                "methods": ["GET", "POST"],
                "paths": ["/repos/*"],
                "apply": {"header": "Authorization", "template": "Bearer {secret}"},
                "clients": ["agents"],
                "profiles": ["release"],
            },
            {
                "name": "pub-key",
                "secret": {"file": "secrets/pub-key"},
                "hosts": ["public.test"],
                "ports": [rec.tls_port],
                "apply": {"header": "X-Api-Key"},
                "clients": ["agents"],
            },
            {
                "name": "first",
                "secret": {"env": "FIRST_TOKEN"},
                "hosts": ["www.public.test"],
                "ports": [rec.tls_port],
                "paths": ["/first/*"],
                "apply": {"header": "X-First"},
                "approval": "first_use",
                "profiles": ["release"],
            },
        ],
    }


def config(upstreams: Any, folder: Path, **over: Any) -> dict[str, Any]:
    return base_config(
        upstreams,
        folder,
        profiles=[{"name": "release"}, {"name": "docs"}],
        clients=[{"name": "agents", "proxy_auth": {"user": "agent", "password_env": "AGENT_PW"}}],
        approvals={
            "timeout": "20s",
            "store": "sqlite:///state/portcullis.db",
            "persist_to": "rules/approved.yaml",
        },
        **over,
    )


@pytest.fixture(scope="module")
def rec(upstreams: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorder]:
    r = Recorder(upstreams, tmp_path_factory.mktemp("recorder")).start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def proxy(
    upstreams: Any, rec: Recorder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PortcullisProc]:
    folder = tmp_path_factory.mktemp("inject")
    (folder / "secrets").mkdir()
    (folder / "secrets" / "pub-key").write_text(PUB + "\n")
    with PortcullisProc(
        folder,
        upstreams,
        config=config(upstreams, folder),
        env=ENV,
        extra_rule_files={"credentials.yaml": json.dumps(rules(rec))},
    ) as p:
        yield p


@pytest.fixture
def r(rec: Recorder) -> Recorder:
    rec.clear()
    return rec


def api(rec: Recorder, path: str = "/repos/acme/web", host: str = "api.public.test") -> str:
    return f"https://{host}:{rec.tls_port}{path}"


def admin(p: PortcullisProc, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"{p.admin_url}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def task(p: PortcullisProc, task_id: str, profile: str) -> tuple[str, str]:
    status, doc = admin(p, "POST", "/credentials", {"task_id": task_id, "profile": profile})
    assert status == 201, doc
    return "--proxy-user", f"{doc['user']}:{doc['password']}"


def last(p: PortcullisProc, **match: Any) -> dict[str, Any]:
    found = p.decisions(**match)
    assert found, match
    return found[-1]


# ---- where the secret goes ---------------------------------------------------------------------------


def test_the_secret_arrives_only_at_the_bound_host_method_and_path(
    proxy: PortcullisProc, r: Recorder
) -> None:
    assert proxy.curl(api(r), *AGENT).status == 200
    assert proxy.curl(api(r), *AGENT, "-X", "POST", "-d", "{}").status == 200
    for url, extra in [
        (api(r), ("-X", "PUT", "-d", "{}")),  # method not bound
        (api(r, "/user"), ()),  # path not bound
        (api(r, "/repos/acme/web", "www.public.test"), ()),  # another allowed host
        (f"https://other.test:{r.other_port}/repos/acme/web", ()),
    ]:
        assert proxy.curl(url, *AGENT, *extra).status == 200, url
    got = r.with_header(GH)
    assert [(g["server"], g["method"], g["path"], g["headers"]["Authorization"]) for g in got] == [
        ("tls", "GET", "/repos/acme/web", f"Bearer {GH}"),
        ("tls", "POST", "/repos/acme/web", f"Bearer {GH}"),
    ]
    assert len(r.requests()) == 6 and all(g["host"].startswith("api.public.test") for g in got)
    ev = last(proxy, **{"request.method": "POST", "request.path": "/repos/acme/web"})
    assert (ev["decision"], ev["credential"], ev["layer"], ev["client"]["user"]) == (
        "allow",
        "gh",
        "inspected",
        "agent",
    )
    assert last(proxy, **{"request.path": "/user"})["credential"] is None


def test_never_over_plain_http(proxy: PortcullisProc, r: Recorder) -> None:
    res = proxy.curl(f"http://api.public.test:{r.http_port}/repos/acme/web", *AGENT)  # bound host and port
    assert res.status == 200
    (seen,) = r.requests()
    assert seen["server"] == "http" and "Authorization" not in seen["headers"]
    assert last(proxy, **{"request.scheme": "http", "request.path": "/repos/acme/web"})["credential"] is None


def test_never_when_the_policy_denies(proxy: PortcullisProc, r: Recorder) -> None:
    res = proxy.curl(api(r, "/repos/denied/x"), *AGENT)
    assert_denied(res, "rule")
    assert r.requests() == []
    ev = last(proxy, **{"request.path": "/repos/denied/x"})
    assert (ev["decision"], ev["rule"], ev["credential"]) == ("deny", "no-denied", None)


def test_only_entitled_authenticated_clients_get_it(proxy: PortcullisProc, r: Recorder) -> None:
    assert proxy.curl(api(r)).status == 200  # anonymous: the request goes, without the secret
    assert proxy.curl(api(r), *task(proxy, "docs-1", "docs")).status == 200  # a task of another profile
    assert r.with_header(GH) == [] and len(r.requests()) == 2
    assert proxy.curl(api(r), *task(proxy, "rel-1", "release")).status == 200
    (got,) = r.with_header(GH)
    assert last(proxy, **{"client.task_id": "rel-1", "layer": "inspected"})["credential"] == "gh"


def test_the_agents_own_value_is_replaced(proxy: PortcullisProc, r: Recorder) -> None:
    res = proxy.curl(api(r), *AGENT, "-H", f"Authorization: Bearer {PH}", "-H", "X-Other: 1")
    assert res.status == 200
    (seen,) = r.requests()
    assert seen["headers"]["Authorization"] == f"Bearer {GH}" and seen["headers"]["X-Other"] == "1"
    res = proxy.curl(api(r, "/", "public.test"), *AGENT, "-H", "X-Api-Key: agent-value")
    assert r.requests()[-1]["headers"]["X-Api-Key"] == PUB


def test_a_redirect_never_carries_the_secret_elsewhere(proxy: PortcullisProc, r: Recorder) -> None:
    for to in (
        api(r, "/landing", "www.public.test"),
        api(r, "/user"),
        f"https://other.test:{r.other_port}/landing",
    ):
        r.clear()
        res = proxy.curl(api(r, f"/repos/redirect?to={to}"), *AGENT, "-L", "--location-trusted")
        assert res.status == 200, (res.stderr, res.headers, res.body)
        assert len(r.requests()) == 2, (r.requests(), res)
        first, second = r.requests()
        assert (
            first["path"].startswith("/repos/redirect")
            and first["headers"]["Authorization"] == f"Bearer {GH}"
        )
        assert second["path"] in ("/landing", "/user") and "Authorization" not in second["headers"]


# ---- leak attempts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "extra"),
    [
        ("https://www.public.test:{tls}/x", ("-H", f"Authorization: Bearer {PH}")),
        ("https://www.public.test:{tls}/x?token=" + PH, ()),
        (
            "https://api.public.test:{tls}/user",
            ("-H", f"Authorization: token {PH}"),
        ),  # bound host, not bound path
        ("https://www.public.test:{tls}/x", ("-d", f"token={GH}")),  # the secret itself, in a held body
        ("https://www.public.test:{tls}/x", ("-u", f"user:{PH}")),  # Basic auth
        ("http://public.test:{http}/x?k=" + PH, ()),  # plain HTTP too
    ],
)
def test_a_placeholder_or_the_secret_sent_elsewhere_is_refused(
    proxy: PortcullisProc, r: Recorder, url: str, extra: tuple[str, ...]
) -> None:
    res = proxy.curl(url.format(tls=r.tls_port, http=r.http_port), *AGENT, *extra)
    body = assert_denied(res, "credential_leak")
    assert "credential 'gh'" in body["message"] and GH not in res.body.decode()
    assert r.requests() == []
    ev = proxy.wait_event("egress.decision", reason="credential_leak", count=1)
    assert ev["credential"] == "gh" and ev["decision"] == "deny"


def test_a_secret_in_a_host_name_is_refused_before_dns(proxy: PortcullisProc, r: Recorder) -> None:
    s, reply = proxy.connect_tunnel(
        f"{GH[:40].lower()}.public.test:443",
        f"Proxy-Authorization: Basic {__import__('base64').b64encode(f'agent:{PW}'.encode()).decode()}\r\n",
    )
    s.close()
    assert reply.status == 403 and reply.headers["x-portcullis-reason"] == "credential_leak"


def test_a_streamed_body_with_a_needle_is_overwritten_and_its_answer_refused(
    proxy: PortcullisProc, r: Recorder, tmp_path: Path
) -> None:
    body = tmp_path / "body"
    body.write_bytes(b"a" * 70_000 + PH.encode() + b"b" * 1000)
    res = proxy.curl(
        api(r, "/upload", "www.public.test"),
        *AGENT,
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        f"@{body}",
    )
    assert res.exit_code == 52 and res.body == b""  # the answer never reaches the agent (empty reply)
    (seen,) = r.requests()
    assert PH.encode() not in seen["body"] and len(seen["body"]) == body.stat().st_size
    allowed, refused = proxy.decisions(**{"request.path": "/upload"})[-2:]
    assert (allowed["decision"], refused["reason"], refused["credential"]) == (
        "allow",
        "credential_leak",
        "gh",
    )
    assert refused["flow_id"] == allowed["flow_id"]


def test_a_large_declared_body_streams_and_is_searched_too(
    proxy: PortcullisProc, r: Recorder, tmp_path: Path
) -> None:
    body = tmp_path / "big"
    body.write_bytes(b"x" * (2 << 20) + b"innocent")
    assert proxy.curl(api(r, "/big", "www.public.test"), *AGENT, "--data-binary", f"@{body}").status == 200
    assert len(r.requests()[0]["body"]) == body.stat().st_size


# ---- first use, rotation ---------------------------------------------------------------------------


def test_the_first_use_in_a_task_waits_for_a_person(proxy: PortcullisProc, r: Recorder) -> None:
    import threading

    who = task(proxy, "rel-first", "release")
    out: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: out.setdefault("res", proxy.curl(api(r, "/first/x", "www.public.test"), *who))
    )
    t.start()
    req = proxy.wait_event("approval.requested", credential="first")
    assert req["client"]["task_id"] == "rel-first" and req["destination"]["host"] == "www.public.test"
    assert r.requests() == []  # held
    status, doc = admin(proxy, "GET", f"/approvals/{req['approval_id']}")
    assert doc["credential"] == "first"
    status, doc = admin(
        proxy, "POST", f"/approvals/{req['approval_id']}", {"decision": "allow", "scope": "always"}
    )
    assert status == 422 and doc["error"] == "credential_scope"
    status, doc = admin(
        proxy, "POST", f"/approvals/{req['approval_id']}", {"decision": "allow", "scope": "session"}
    )
    assert status == 200, doc
    t.join(20)
    assert out["res"].status == 200
    assert r.requests()[0]["headers"]["X-First"] == FIRST
    assert proxy.curl(api(r, "/first/y", "www.public.test"), *who).status == 200  # not asked again
    assert r.requests()[1]["headers"]["X-First"] == FIRST
    assert len(proxy.find("approval.requested", credential="first")) == 1
    ev = last(proxy, **{"request.path": "/first/x"})
    assert (ev["reason"], ev["credential"], ev["approval_id"]) == ("approved", "first", req["approval_id"])


def test_rotating_the_secret_file_takes_effect_on_reload(proxy: PortcullisProc, r: Recorder) -> None:
    key = proxy.folder / "secrets" / "pub-key"
    new = "pub-key-rotated-" + secrets.token_hex(8)
    reloads = len(proxy.find("rules.reloaded"))
    tmp = key.with_name(".pub-key.tmp")
    tmp.write_text(new + "\n")
    os.replace(tmp, key)  # an atomic writer, as a secret manager's agent does
    proxy.wait_event("rules.reloaded", count=reloads + 1, timeout=15)
    assert proxy.curl(api(r, "/", "public.test"), *AGENT).status == 200
    assert r.requests()[-1]["headers"]["X-Api-Key"] == new
    key.write_text("")  # emptied: the reload is refused, the value in force stays
    proxy.wait_event("rules.reload_failed", timeout=15)
    assert proxy.curl(api(r, "/", "public.test"), *AGENT).status == 200
    assert r.requests()[-1]["headers"]["X-Api-Key"] == new
    key.write_text(PUB + "\n")
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_event("rules.reloaded", count=reloads + 2, timeout=15)
    assert proxy.curl(api(r, "/", "public.test"), *AGENT).status == 200
    assert r.requests()[-1]["headers"]["X-Api-Key"] == PUB


def test_check_says_which_credential_a_url_gets(proxy: PortcullisProc, rec: Recorder) -> None:
    import subprocess
    import sys

    from tests.harness import REPO

    def check(*args: str) -> dict[str, Any]:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "addons.cli",
                "check",
                "--config",
                str(proxy.config_path),
                "--json",
                *args,
            ],
            cwd=REPO,
            capture_output=True,
            timeout=60,
            check=False,
            env={**os.environ, "GH_TOKEN": ""},
        )
        doc: dict[str, Any] = json.loads(out.stdout)
        assert GH not in out.stdout.decode() + out.stderr.decode()
        return doc

    url = api(rec)
    both = check(url, "--client", "agents")  # a proxy_auth group the credential names
    assert both["credential"] == "gh" and both["credentials"][0]["applied"]
    rel = check(url, "--profile", "release")
    assert rel["credential"] == "gh" and rel["credentials"][0]["profiles"] == ["release"]
    docs = check(url, "--profile", "docs")
    assert docs["credential"] is None and "not in its profiles" in docs["credentials"][0]["why_not"]
    plain = check(f"http://api.public.test:{rec.http_port}/repos/a", "--client", "agents")
    assert plain["credential"] is None and "only into https" in plain["credentials"][0]["why_not"]
    first = check(api(rec, "/first/x", "www.public.test"), "--profile", "release")
    assert first["decision"] == "approval" and first["credentials"][0]["approval"] == "first_use"
