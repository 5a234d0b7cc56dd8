"""addons/proxy/launcher.py without listening: every startup problem is one line and exit 2 (unsupported
mitmproxy, bad listen addresses, an admin token missing off loopback, a proxy_auth password not set,
an unreadable upstream CA), the combined upstream trust bundle, the proxy's own addresses (never a
destination), and the mitmproxy master it builds (only the addons Portcullis needs, decided options).
Running the whole process is tests/proxy/e2e/test_lifecycle.py."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from addons.config.load import load_config
from addons.proxy import launcher, mitm_compat
from addons.proxy.launcher import (
    StartupError,
    parse_hostport,
    prepare,
    run_command,
    upstream_bundle,
)
from addons.proxy.mitm_compat import TunnelAwareNextLayer
from addons.proxy.runtime import Runtime, local_addresses
from tests.policy.pol_helpers import write_config


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:9090", ("localhost", 9090)),
    ],
)
def test_parse_hostport(text: str, want: tuple[str, int]) -> None:
    assert parse_hostport(text, "listen") == want


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1", "has no port"),
        ("127.0.0.1:99999", "bad port"),
        ("a b:80", "not a host name"),
        ("::1:80", "bad authority"),
    ],
)
def test_parse_hostport_errors_name_the_setting(text: str, message: str) -> None:
    with pytest.raises(StartupError) as e:
        parse_hostport(text, "admin.listen")
    assert str(e.value).startswith("admin.listen: ") and message in str(e.value)


def args(
    cfg: Path, listen: str | None = "127.0.0.1:0", admin: str | None = "127.0.0.1:0"
) -> argparse.Namespace:
    return argparse.Namespace(config=str(cfg), listen=listen, admin=admin, workers=1, worker=None)


def config(tmp_path: Path, **kw: Any) -> Path:
    kw.setdefault("tls", {"ca_dir": "certs/"})
    return write_config(tmp_path, [{"name": "a", "action": "allow", "hosts": ["a.test"]}], **kw)


def test_prepare_builds_the_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORTCULLIS_ADMIN_TOKEN", raising=False)
    p = prepare(args(config(tmp_path), listen="127.0.0.1:18080", admin="127.0.0.1:19090"))
    rt = Runtime(p)
    assert (p.listen, p.admin, p.token, p.bundle) == (
        ("127.0.0.1", 18080),
        ("127.0.0.1", 19090),
        None,
        None,
    )
    assert (tmp_path / "certs" / "mitmproxy-ca-cert.pem").exists()
    assert rt.pipeline.policies is rt.holder and rt.pipeline.lookup is not None
    assert rt.pipeline.audit is False and rt.addon.pipeline is rt.pipeline
    assert rt.ready() is False  # not listening yet


def test_the_config_addresses_apply_without_overrides(tmp_path: Path) -> None:
    p = prepare(
        args(config(tmp_path, listen="127.0.0.1:18081", admin={"listen": "[::1]:19091"}), None, None)
    )
    assert p.listen == ("127.0.0.1", 18081) and p.admin == ("::1", 19091)


def test_audit_mode_reaches_the_pipeline(tmp_path: Path) -> None:
    assert Runtime(prepare(args(config(tmp_path, mode="audit")))).pipeline.audit is True


def test_an_unsupported_mitmproxy_is_a_startup_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mitm_compat, "check_version", lambda: "mitmproxy 13.0 is not supported; install ...")
    with pytest.raises(StartupError, match="mitmproxy 13.0 is not supported"):
        prepare(args(config(tmp_path)))


def test_an_admin_listener_off_loopback_needs_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PC_TOKEN_T", raising=False)
    cfg = config(tmp_path, admin={"token_env": "PC_TOKEN_T"})
    with pytest.raises(StartupError) as e:
        prepare(args(cfg, admin="0.0.0.0:0"))
    assert str(e.value).startswith(f"{cfg}: ") and "PC_TOKEN_T" in str(e.value)
    monkeypatch.setenv("PC_TOKEN_T", "s3cret")
    assert prepare(args(cfg, admin="0.0.0.0:0")).token == "s3cret"


def test_a_proxy_auth_password_must_be_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PC_PW_T", raising=False)
    cfg = config(tmp_path, clients=[{"name": "r", "proxy_auth": {"user": "r", "password_env": "PC_PW_T"}}])
    with pytest.raises(StartupError, match="PC_PW_T"):
        prepare(args(cfg))


def test_an_unreadable_upstream_ca_is_a_startup_error(tmp_path: Path) -> None:
    cfg = config(tmp_path, tls={"ca_dir": "certs/", "upstream_ca": "missing.pem"})
    with pytest.raises(StartupError, match="tls.upstream_ca: cannot read"):
        prepare(args(cfg))


def test_an_upstream_ca_is_trusted_besides_the_system_roots(tmp_path: Path) -> None:
    import certifi

    (tmp_path / "corp.pem").write_text("-----BEGIN CERTIFICATE-----\ncorp\n-----END CERTIFICATE-----\n")
    loaded = load_config(config(tmp_path, tls={"ca_dir": "certs/", "upstream_ca": "corp.pem"}))
    (tmp_path / "certs").mkdir()
    bundle = upstream_bundle(loaded, tmp_path / "certs")
    assert bundle == str(tmp_path / "certs" / "upstream-trust.pem")
    text = Path(bundle).read_text()
    assert text.startswith(Path(certifi.where()).read_text()) and text.endswith(
        "corp\n-----END CERTIFICATE-----\n"
    )
    (tmp_path / "plain").mkdir()
    assert upstream_bundle(load_config(config(tmp_path / "plain")), tmp_path / "certs") is None


def test_local_addresses_include_loopback() -> None:
    assert {"127.0.0.1", "::1"} <= local_addresses()
    assert all("%" not in a for a in local_addresses())


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    return Runtime(prepare(args(config(tmp_path))))


def test_the_proxys_own_addresses(runtime: Runtime) -> None:
    own = runtime.own
    own.add("127.0.0.1", 18080)  # loopback: every 127/8 address reaches it
    own.add("10.9.8.7", 19090)
    own.add("not-an-ip", 1)  # ignored
    assert own("127.0.0.1", 18080) and own("127.0.0.53", 18080)
    assert not own("127.0.0.1", 18081) and not own("8.8.8.8", 18080)
    assert own("10.9.8.7", 19090) and not own("10.9.8.8", 19090)
    assert not own("10.9.8.7", 18080)
    assert not own("garbage", 18080)


def test_a_wildcard_listener_owns_every_local_address(runtime: Runtime) -> None:
    runtime.own.add("0.0.0.0", 18082)
    for a in local_addresses():
        assert runtime.own(a, 18082)
    assert runtime.own("127.0.0.9", 18082)


def test_the_pipeline_refuses_the_proxys_own_addresses(runtime: Runtime) -> None:
    runtime.own.add("127.0.0.1", 18083)
    assert runtime.pipeline.is_own("127.0.0.2", 18083)


async def test_the_master_has_only_what_portcullis_needs(runtime: Runtime) -> None:
    m = runtime.build_master()
    names = [type(a).__name__ for a in m.addons.chain]
    assert names == ["Core", "Proxyserver", "TunnelAwareNextLayer", "TlsConfig", "Portcullis", "Lifecycle"]
    assert any(isinstance(a, TunnelAwareNextLayer) for a in m.addons.chain)
    o = m.options
    assert (o.connection_strategy, o.rawtcp, o.websocket, o.stream_large_bodies) == (
        "eager",
        False,
        True,
        "1m",
    )
    assert o.validate_inbound_headers is True and o.mode == ["regular"]
    assert (o.listen_host, o.listen_port) == ("127.0.0.1", 0)
    assert o.confdir == str(runtime.p.ca_dir)


@pytest.mark.parametrize(
    ("config_text", "want"),
    [
        ("bogus: 1\n", ":1:1: unknown key 'bogus'"),
        ("listen: nowhere\n", "listen: 'nowhere' is not host:port"),
    ],
)
def test_run_command_reports_config_errors_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config_text: str, want: str
) -> None:
    (tmp_path / "c.yaml").write_text(config_text)
    assert run_command(args(tmp_path / "c.yaml")) == 2
    err = capsys.readouterr().err
    assert want in err and "Traceback" not in err


def test_run_command_reports_startup_errors_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launcher, "prepare", lambda a: (_ for _ in ()).throw(StartupError("one line")))
    assert run_command(args(tmp_path / "c.yaml")) == 2
    assert capsys.readouterr().err == "one line\n"
