"""addons/policy/model.py: the shared vocabulary (closed enums, who a client is, what a request is)."""

from __future__ import annotations

import dataclasses

import pytest

from addons.policy.model import Action, Client, Decision, Layer, Reason, Request


@pytest.mark.parametrize(
    ("client", "key"),
    [
        (Client("10.0.0.1", 5000, "alice"), "user:alice"),
        (Client("10.0.0.1", 5000), "10.0.0.1"),
        (Client(None), "-"),
        (Client("", user=""), "-"),
    ],
)
def test_a_client_is_its_user_else_its_address(client: Client, key: str) -> None:
    assert client.key == key


@pytest.mark.parametrize(
    ("layer", "tunnel"), [(Layer.CONNECT, True), (Layer.HTTP, False), (Layer.INSPECTED, False)]
)
def test_only_a_connect_is_a_tunnel(layer: Layer, tunnel: bool) -> None:
    assert Request("h.test", 443, layer=layer).tunnel is tunnel


def test_the_enums_are_closed_sets_of_log_values() -> None:
    assert [a.value for a in Action] == ["allow", "deny", "approval"]
    assert [layer.value for layer in Layer] == ["http", "connect", "inspected"]
    assert {r.value for r in Reason} == {
        "rule",
        "default",
        "private_address",
        "sni_mismatch",
        "host_mismatch",
        "approval_denied",
        "approval_timeout",
        "approval_pending",
        "bad_request",
        "approved",
        "inspect",
        "proxy_auth",
        "client_closed",
        "internal_error",
        "upstream_error",
        "credential_leak",
        "event_sink_stalled",
    }
    assert Reason("rule") is Reason.RULE and str(Reason.RULE) == "rule"
    with pytest.raises(ValueError):
        Reason("other")


def test_values_are_immutable_and_defaults_are_empty() -> None:
    r = Request("h.test", 443)
    assert (r.client, r.scheme, r.method, r.path, r.layer, r.flow_id) == (
        Client(None),
        None,
        None,
        None,
        Layer.HTTP,
        "",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.host = "other"  # type: ignore[misc]
    d = Decision(Action.DENY, Reason.DEFAULT)
    assert (d.rule, d.matched, d.inspect, d.raw_tcp, d.extra) == (None, (), False, False, {})
