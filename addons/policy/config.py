"""Strict pydantic models of the config file and the rule files (unknown keys are errors).

These models check shape and scalar types only. Host patterns, CIDRs, client references and
cross-file checks (unique rule names) are compiled and checked by `load`, which reports every
problem as `path:line:col: message`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h)$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float:
    """`120s`, `5m`, `1h` (or a bare number of seconds) -> seconds as a float."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number with s, m or h (e.g. 120s)")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value.strip())):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"bad duration {value!r}: use a number with s, m or h (e.g. 120s, 5m, 1h)")
    if seconds <= 0:
        raise ValueError("a duration must be greater than zero")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
ActionName = Literal["allow", "deny", "approval"]
NonEmpty = Annotated[str, Field(min_length=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class AdminConfig(Strict):
    listen: NonEmpty = "127.0.0.1:9090"
    token_env: NonEmpty = "PORTCULLIS_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a secret


class WebhookConfig(Strict):
    url: NonEmpty
    secret_env: NonEmpty


class ApprovalsConfig(Strict):
    timeout: Duration = 120.0
    hold: bool = True
    session_ttl: Duration = 3600.0
    persist_to: NonEmpty | None = "rules/approved.yaml"
    store: NonEmpty = "sqlite:///state/portcullis.db"
    webhooks: list[WebhookConfig] = []


class NetworkConfig(Strict):
    block_private: bool = True
    allow_cidrs: list[NonEmpty] = []
    resolve: dict[NonEmpty, NonEmpty | list[NonEmpty]] = {}


class TlsConfig(Strict):
    inspect: Literal["auto", "never", "always"] = "auto"
    ca_dir: NonEmpty = "certs/"
    upstream_ca: NonEmpty | None = None


class ProxyAuthConfig(Strict):
    user: NonEmpty
    password_env: NonEmpty


class ClientConfig(Strict):
    name: NonEmpty
    cidrs: list[NonEmpty] = []
    proxy_auth: ProxyAuthConfig | None = None


class LogConfig(Strict):
    format: Literal["json", "ocsf", "console"] = "json"
    file: NonEmpty | None = None
    # What to do when the event file cannot be written: "closed" denies new requests
    # until it can be written again; "open" keeps deciding and counts the lost events.
    on_write_error: Literal["closed", "open"] = "closed"


class TelemetryConfig(Strict):
    log: LogConfig = LogConfig()
    metrics: bool = True
    otlp: bool = False


class Config(Strict):
    listen: NonEmpty = "127.0.0.1:8080"
    admin: AdminConfig = AdminConfig()
    rules: list[NonEmpty] = ["rules/"]
    default_action: ActionName = "approval"
    mode: Literal["enforce", "audit"] = "enforce"
    approvals: ApprovalsConfig = ApprovalsConfig()
    network: NetworkConfig = NetworkConfig()
    tls: TlsConfig = TlsConfig()
    clients: list[ClientConfig] = []
    telemetry: TelemetryConfig = TelemetryConfig()


class RuleModel(Strict):
    name: NonEmpty
    action: ActionName
    hosts: Annotated[list[NonEmpty], Field(min_length=1)]
    ports: Annotated[list[Annotated[int, Field(ge=1, le=65535)]], Field(min_length=1)] | None = None
    methods: Annotated[list[NonEmpty], Field(min_length=1)] | None = None
    paths: Annotated[list[NonEmpty], Field(min_length=1)] | None = None
    clients: Annotated[list[NonEmpty], Field(min_length=1)] | None = None
    raw_tcp: bool = False
    description: str | None = None


class RuleFile(Strict):
    rules: list[RuleModel] = []
