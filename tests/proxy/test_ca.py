"""addons/proxy/ca.py: the interception CA is created once in tls.ca_dir, its private key readable only by
its owner; `portcullis ca` prints the public certificate's path; a folder owned by another uid is named."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import pytest

from addons.proxy import ca
from addons.proxy.ca import SECRET_FILES, ca_command, ensure_ca, public_cert_path


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_the_ca_is_created_with_owner_only_secrets(tmp_path: Path) -> None:
    d = tmp_path / "certs" / "nested"
    cert = ensure_ca(d)
    assert cert == public_cert_path(d) == d / "mitmproxy-ca-cert.pem"
    assert cert.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert mode(d) == 0o700
    for name in SECRET_FILES:
        assert mode(d / name) == 0o600, name
    assert "PRIVATE KEY" in (d / "mitmproxy-ca.pem").read_text()
    assert "PRIVATE KEY" not in cert.read_text()


def test_an_existing_ca_is_kept_and_its_permissions_tightened(tmp_path: Path) -> None:
    ensure_ca(tmp_path)
    key = (tmp_path / "mitmproxy-ca.pem").read_bytes()
    os.chmod(tmp_path, 0o755)
    os.chmod(tmp_path / "mitmproxy-ca.pem", 0o644)
    ensure_ca(tmp_path)
    assert (tmp_path / "mitmproxy-ca.pem").read_bytes() == key  # not regenerated
    assert mode(tmp_path) == 0o700 and mode(tmp_path / "mitmproxy-ca.pem") == 0o600


def test_a_permission_error_names_the_file_and_the_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(ca_dir: Path) -> Path:
        raise PermissionError(13, "Permission denied", str(ca_dir / "mitmproxy-ca.pem"))

    monkeypatch.setattr(ca, "_ensure_ca", denied)
    monkeypatch.setattr(ca, "_ownership_hint", lambda d: " (the folder belongs to uid 4242 ...)")
    with pytest.raises(PermissionError) as e:
        ensure_ca(tmp_path)
    assert str(tmp_path / "mitmproxy-ca.pem") in str(e.value) and "uid 4242" in str(e.value)


def test_the_ownership_hint(tmp_path: Path) -> None:
    assert ca._ownership_hint(tmp_path) == ""  # ours
    assert ca._ownership_hint(tmp_path / "missing") == ""
    if os.getuid() != 0:
        pytest.skip("giving a folder to another uid needs root")
    other = tmp_path / "theirs"
    other.mkdir()
    os.chown(other, 4242, -1)
    hint = ca._ownership_hint(other)
    assert "belongs to uid 4242" in hint and f"chown -R {os.getuid()}" in hint and "named volume" in hint


def test_ca_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ca_command(argparse.Namespace(dir=str(tmp_path / "c"))) == 0
    assert capsys.readouterr().out.strip() == str((tmp_path / "c" / "mitmproxy-ca-cert.pem").resolve())
    (tmp_path / "file").write_text("not a folder")
    assert ca_command(argparse.Namespace(dir=str(tmp_path / "file"))) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"portcullis ca: cannot create the CA in {tmp_path / 'file'}: ")
