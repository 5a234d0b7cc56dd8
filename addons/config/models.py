"""Strict pydantic models of the config file and the rule files (unknown keys are errors).

These models check shape and scalar types only. Host patterns, CIDRs, client references and
cross-file checks (unique rule names) are compiled and checked by `load`, which reports every
problem as `path:line:col: message`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from addons.policy.authority import split_authority

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


class ApproverConfig(Strict):
    """A named person (or bot) who may decide approvals; `admin` may also mint task credentials."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
    token_env: NonEmpty | None = None      # the variable holding this approver's bearer token
    token_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None  # or its SHA-256 (hex)
    role: Literal["approver", "admin"] = "approver"

    @model_validator(mode="after")
    def _one_token(self) -> ApproverConfig:
        if (self.token_env is None) == (self.token_sha256 is None):
            raise ValueError(f"approver {self.name!r}: give exactly one of token_env and token_sha256")
        return self


class AdminConfig(Strict):
    listen: NonEmpty = "127.0.0.1:9090"
    token_env: NonEmpty = "PORTCULLIS_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a secret
    approvers: list[ApproverConfig] = []


class WebhookConfig(Strict):
    url: NonEmpty
    secret_env: NonEmpty
    timeout: Duration = 10.0  # one delivery attempt, connect to answer; then it is retried


class LinksConfig(Strict):
    """Per-approval decision links for chat tools: signed, expiring, good for one approval only."""

    secret_env: NonEmpty  # the variable holding the signing key (the same on every replica)
    ttl: Duration = 900.0  # at most the approval's own time left


class ApprovalsConfig(Strict):
    timeout: Duration = 120.0
    hold: bool = True
    session_ttl: Duration = 3600.0
    persist_to: NonEmpty | None = "rules/approved.yaml"
    store: NonEmpty = "sqlite:///state/portcullis.db"
    webhooks: list[WebhookConfig] = []
    links: LinksConfig | None = None  # webhook bodies carry a decide_link when set


class NetworkConfig(Strict):
    block_private: bool = True
    allow_cidrs: list[NonEmpty] = []
    resolve: dict[NonEmpty, NonEmpty | list[NonEmpty]] = {}
    # A connection on which nothing moves for this long, either way, is closed (mitmproxy's
    # tcp_timeout): a stalled upstream, an idle keep-alive client, a quiet tunnel. Held requests
    # do not count (the clock stops while a hook runs).
    idle_timeout: Duration = 600.0
    # An HTTP/1 request head still incomplete this long after its first byte is refused with 408
    # (slow-loris clients trickle bytes, so the idle timeout never fires for them).
    header_timeout: Duration = 30.0

    @field_validator("idle_timeout", "header_timeout")
    @classmethod
    def _timeouts(cls, v: float) -> float:
        if not 1.0 <= v <= 86400.0:
            raise ValueError("use a duration between 1s and 24h")
        return v


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


_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ProfileConfig(Strict):
    """A named rule set for agent tasks (e.g. frontend, docs-only): rules name it in `profiles:`."""

    name: Annotated[str, Field(pattern=_NAME)]
    description: str | None = None


class CredentialsConfig(Strict):
    """Task credentials minted through the admin API (`POST /credentials`)."""

    required: bool = False  # every client must present a task credential (no anonymous egress)
    default_ttl: Duration = 8 * 3600.0
    max_ttl: Duration = 24 * 3600.0
    proxy_url: NonEmpty | None = None  # the proxy as agents reach it (default: the listen address)


class LogConfig(Strict):
    format: Literal["json", "ocsf", "console"] = "json"
    file: NonEmpty | None = None
    # What to do when the event file cannot be written: "closed" denies new requests
    # until it can be written again; "open" keeps deciding and counts the lost events.
    on_write_error: Literal["closed", "open"] = "closed"
    # Events queued for stdout while its reader is slow; at this many the proxy refuses new requests
    # (503 event_sink_stalled) until the reader catches up (closed), or drops past twice it (open).
    stdout_buffer: int = Field(default=10000, ge=16, le=1_000_000)


# RFC 5424 facility codes, by the names syslog.conf and rsyslog use.
SYSLOG_FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "security": 13, "console": 14,
    "solaris-cron": 15, **{f"local{i}": 16 + i for i in range(8)},
}


def _facility(value: object) -> object:
    if isinstance(value, str):
        if value not in SYSLOG_FACILITIES:
            raise ValueError(f"unknown facility {value!r}: use a name (kern, user, daemon, auth, authpriv, "
                             "local0 ... local7, ...) or a number 0-23")
        return SYSLOG_FACILITIES[value]
    return value


_PRINTUSASCII = re.compile(r"^[\x21-\x7e]+$")


def _header_field(limit: int) -> BeforeValidator:
    """An RFC 5424 header field: 1..limit printable US-ASCII characters, no space."""
    def check(value: object) -> object:
        if isinstance(value, str) and not (len(value) <= limit and _PRINTUSASCII.match(value)):
            raise ValueError(f"use 1 to {limit} printable ASCII characters without spaces (RFC 5424)")
        return value
    return BeforeValidator(check)


class SyslogTlsConfig(Strict):
    ca: NonEmpty | None = None            # PEM bundle that verifies the receiver (default: system store)
    server_name: NonEmpty | None = None   # name expected in the receiver's certificate (default: the host)
    cert: NonEmpty | None = None          # client certificate, for receivers that require one
    key: NonEmpty | None = None           # its private key (default: in the cert file)

    @model_validator(mode="after")
    def _key_needs_cert(self) -> SyslogTlsConfig:
        if self.key is not None and self.cert is None:
            raise ValueError("tls.key is set without tls.cert")
        return self


class SyslogConfig(Strict):
    """`telemetry.syslog`: RFC 5424 messages to a syslog receiver (off when absent or null)."""

    address: NonEmpty                      # HOST:PORT (port defaults: udp/tcp 514, tls 6514)
    transport: Literal["udp", "tcp", "tls"]
    facility: Annotated[int, BeforeValidator(_facility), Field(ge=0, le=23)] = SYSLOG_FACILITIES["local0"]
    app_name: Annotated[str, _header_field(48)] = "portcullis"
    hostname: Annotated[str, _header_field(255)] | None = None   # default: this machine's name
    buffer: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000  # events held while the receiver is away
    tls: SyslogTlsConfig | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        host, _ = split_authority(value)  # AuthorityError is a ValueError: reported with its position
        if host in ("[]", ""):
            raise ValueError(f"{value!r} has no host (expected HOST:PORT)")
        return value

    @model_validator(mode="after")
    def _tls_only_with_tls(self) -> SyslogConfig:
        if self.tls is not None and self.transport != "tls":
            raise ValueError(f"tls: is only used with transport: tls (not {self.transport})")
        return self


class TelemetryConfig(Strict):
    log: LogConfig = LogConfig()
    metrics: bool = True
    otlp: bool = False
    syslog: SyslogConfig | None = None


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
    profiles: list[ProfileConfig] = []
    credentials: CredentialsConfig = CredentialsConfig()
    telemetry: TelemetryConfig = TelemetryConfig()


class RuleModel(Strict):
    name: NonEmpty
    action: ActionName
    hosts: Annotated[list[NonEmpty], Field(min_length=1)]
    ports: Annotated[list[Annotated[int, Field(ge=1, le=65535)]], Field(min_length=1)] | None = None
    methods: Annotated[list[NonEmpty], Field(min_length=1)] | None = None
    paths: Annotated[list[NonEmpty], Field(min_length=1)] | None = None
    clients: Annotated[list[NonEmpty], Field(min_length=1)] | None = None
    profiles: Annotated[list[NonEmpty], Field(min_length=1)] | None = None
    raw_tcp: bool = False
    description: str | None = None


class SecretSourceModel(Strict):
    """Where a credential's secret comes from: an environment variable or a file (read at start and
    on every reload; a file is the rotation path, the environment of a running process never changes)."""

    env: NonEmpty | None = None
    file: NonEmpty | None = None  # relative to the config file

    @model_validator(mode="after")
    def _one_source(self) -> SecretSourceModel:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env and file")
        return self


class BasicModel(Strict):
    username: NonEmpty  # the secret is the password


class ApplyModel(Strict):
    """How the secret goes on the request: `{header: H, template: "Bearer {secret}"}` or
    `{basic: {username: x-access-token}}` (Authorization: Basic, the secret as the password)."""

    header: NonEmpty | None = None
    template: NonEmpty = "{secret}"
    basic: BasicModel | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ApplyModel:
        if (self.header is None) == (self.basic is None):
            raise ValueError("give exactly one of header (with template) and basic")
        if self.basic is not None and "template" in self.model_fields_set:
            raise ValueError("template goes with header, not with basic")
        return self


class CredentialModel(Strict):
    name: Annotated[str, Field(pattern=_NAME)]
    secret: SecretSourceModel
    hosts: Annotated[list[NonEmpty], Field(min_length=1)]
    scheme: Literal["https"] = "https"  # the only one: never over plain HTTP
    ports: Annotated[list[Annotated[int, Field(ge=1, le=65535)]], Field(min_length=1)] = [443]
    methods: Annotated[list[NonEmpty], Field(min_length=1)] | None = None
    paths: Annotated[list[NonEmpty], Field(min_length=1)] | None = None
    apply: ApplyModel
    profiles: Annotated[list[NonEmpty], Field(min_length=1)] | None = None
    clients: Annotated[list[NonEmpty], Field(min_length=1)] | None = None
    approval: Literal["none", "first_use"] = "none"
    placeholders: Annotated[list[NonEmpty], Field(min_length=1)] | None = None
    description: str | None = None


class RuleFile(Strict):
    rules: list[RuleModel] = []
    credentials: list[CredentialModel] = []
