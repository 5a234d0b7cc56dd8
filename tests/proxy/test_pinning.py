"""addons/proxy/pinning.py: the `server_connect` side of pinning, in process with mitmproxy's test
connections: every upstream connection goes to an address a decision checked (else it is refused), TLS
keeps the name, and the name is given back once connected (mitmproxy's connection reuse needs it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mitmproxy import connection
from mitmproxy.proxy import server_hooks
from mitmproxy.test import tflow

from addons.pipeline.dns import Pin, PinStore
from addons.proxy.addon import Portcullis
from addons.proxy.pinning import Pinner
from tests.pipeline import pipe_helpers as ph
from tests.pipeline.pipe_helpers import Lookup, http
from tests.telemetry.tel_helpers import make as make_telemetry

PUBLIC_A = "8.8.8.8"


def hook(host: str | None, port: int = 443, client_id: str = "c1") -> server_hooks.ServerConnectionHookData:
    client = tflow.tclient_conn()
    client.id = client_id
    address = (host, port) if host is not None else None
    return server_hooks.ServerConnectionHookData(server=connection.Server(address=address), client=client)


def addon(tmp_path: Path, lookup: Lookup | None = None) -> Portcullis:
    pipeline, _, _ = ph.pipeline(ph.policy(tmp_path), lookup=lookup or Lookup())
    tel, _ = make_telemetry()
    return Portcullis(pipeline, tel)


async def test_a_name_whose_second_resolution_changes_stays_on_the_first_checked_address(
    tmp_path: Path,
) -> None:
    lookup = Lookup({"api.public.test": [PUBLIC_A]})
    a = addon(tmp_path, lookup)
    v1 = await a.pipeline.decide(http("api.public.test", 443, host_header="api.public.test:443"))
    assert v1.passes and v1.ip == PUBLIC_A
    lookup.table["api.public.test"] = ["127.0.0.1"]  # rebinding
    # Same client connection: no second DNS query; the pinned, checked answer is reused.
    v2 = await a.pipeline.decide(http("api.public.test", 443, host_header="api.public.test:443"))
    assert v2.passes and v2.ip == PUBLIC_A and lookup.calls == ["api.public.test"]
    # The connect goes to the checked address, with SNI/verification on the name.
    data = hook("api.public.test")
    a.server_connect(data)
    assert data.server.address == (PUBLIC_A, 443) and data.server.sni == "api.public.test"
    assert data.server.error is None
    a.server_connected(data)
    assert data.server.address == ("api.public.test", 443)  # restored for connection reuse
    # A new client connection resolves again and sees the rebinding: refused.
    v3 = await a.pipeline.decide(
        http("api.public.test", 443, host_header="api.public.test:443", conn_id="c2")
    )
    assert not v3.passes and v3.reason == "private_address"
    assert a.pipeline.pins.get("c2", "api.public.test", 443) is None


def test_server_connect_without_a_decision_is_refused(tmp_path: Path) -> None:
    a = addon(tmp_path)
    data = hook("other.example.com")
    a.server_connect(data)
    assert data.server.error and data.server.address == ("other.example.com", 443)


def test_an_error_while_pinning_refuses_the_connection(tmp_path: Path) -> None:
    a = addon(tmp_path)

    class Broken:
        def get(self, *a: object) -> None:
            raise RuntimeError("boom")

    a.pinner.pins = Broken()  # type: ignore[assignment]
    data = hook("api.example.com")
    a.server_connect(data)
    assert data.server.error and data.server.address == ("api.example.com", 443)


@pytest.fixture
def pinner() -> tuple[Pinner, PinStore]:
    pins = PinStore()
    pins.put("c1", Pin("a.test", 443, (PUBLIC_A, "1.1.1.1")))
    pins.put("c1", Pin("8.8.4.4", 443, ("8.8.4.4",)))
    return Pinner(pins), pins


@pytest.mark.parametrize("spelling", ["a.test", "A.TEST.", "A.Test"])
def test_every_spelling_of_a_pinned_name_dials_its_first_checked_address(
    pinner: tuple[Pinner, PinStore], spelling: str
) -> None:
    p, _ = pinner
    data = hook(spelling)
    p.pin(data)
    assert data.server.error is None and data.server.address == (PUBLIC_A, 443)
    assert data.server.sni == "a.test"  # TLS is verified against the (normalised) name
    p.restore(data.server)
    assert data.server.address == (spelling, 443)  # the name as mitmproxy asked for it


def test_an_ip_literal_gets_no_sni_and_an_existing_sni_is_kept(pinner: tuple[Pinner, PinStore]) -> None:
    p, _ = pinner
    lit = hook("8.8.4.4")
    p.pin(lit)
    assert lit.server.address == ("8.8.4.4", 443) and lit.server.sni is None and lit.server.error is None
    named = hook("a.test")
    named.server.sni = "a.test"
    p.pin(named)
    assert named.server.sni == "a.test" and named.server.address == (PUBLIC_A, 443)


@pytest.mark.parametrize(
    ("host", "port", "client_id"),
    [("a.test", 8443, "c1"), ("a.test", 443, "c2"), ("b.test", 443, "c1")],
    ids=["other-port", "other-connection", "other-host"],
)
def test_a_connect_no_decision_covered_is_refused(
    pinner: tuple[Pinner, PinStore], host: str, port: int, client_id: str
) -> None:
    p, _ = pinner
    data = hook(host, port, client_id)
    p.pin(data)
    assert data.server.error == "portcullis: destination was not checked"
    assert data.server.address == (host, port)


def test_an_unusable_destination_is_refused(pinner: tuple[Pinner, PinStore]) -> None:
    p, _ = pinner
    data = hook("a..test")
    p.pin(data)
    assert data.server.error == "portcullis: unusable destination"


def test_a_connect_already_refused_or_without_address_is_left_alone(pinner: tuple[Pinner, PinStore]) -> None:
    p, _ = pinner
    refused = hook("a.test")
    refused.server.error = "refused earlier"
    p.pin(refused)
    assert refused.server.error == "refused earlier" and refused.server.address == ("a.test", 443)
    nowhere = hook(None)
    p.pin(nowhere)
    assert nowhere.server.address is None and nowhere.server.error is None


def test_restore_and_forget_only_touch_pinned_connections(pinner: tuple[Pinner, PinStore]) -> None:
    p, _ = pinner
    data = hook("a.test")
    p.pin(data)
    p.forget(data.server)  # disconnected before it connected: nothing to give back
    p.restore(data.server)
    assert data.server.address == (PUBLIC_A, 443)
    other = hook("a.test")
    p.restore(other.server)  # never pinned: untouched
    assert other.server.address == ("a.test", 443)


def test_the_addon_hooks_drive_the_pinner(tmp_path: Path) -> None:
    a = addon(tmp_path)
    a.pipeline.pins.put("c1", Pin("a.test", 443, (PUBLIC_A,)))
    ok = hook("a.test")
    a.server_connect(ok)
    a.server_connect_error(ok)  # a failed connect gives the name back too
    assert ok.server.address == ("a.test", 443)
    again = hook("a.test")
    a.server_connect(again)
    a.server_disconnected(again)
    a.server_connected(again)  # forgotten: nothing restored any more
    assert again.server.address == (PUBLIC_A, 443)
