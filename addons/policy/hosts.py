"""Host normalisation, IP literal canonicalisation and the host-pattern grammar (address classes:
addons/policy/addresses.py)."""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

import idna

from addons.policy.psl import PSL as _PSL
from addons.policy.psl import public_suffix_section

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class HostError(ValueError):
    """A host name, IP literal or host pattern that cannot be used; the message says why."""


# Dots that IDNA (UTS 46) maps to '.'; we replace them first so labels split the same way everywhere.
_UNICODE_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
# An ASCII label as we accept it. '_' is allowed: real hostnames carry it and browsers/curl accept it;
# it is compared exactly, so it opens no bypass.
_ASCII_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
# Lower-case ASCII labels, the last led by a letter or '_' (never an IPv4 spelling): normalize_host
# returns such a name unchanged; most rule entries are one (parse_pattern skips its checks for them).
_PLAIN_NAME = re.compile(
    r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_ASCII_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")
_NUMERIC_PART = re.compile(r"^(?:0[xX][0-9a-fA-F]*|[0-9]+)$")


# ---------------------------------------------------------------------------------------------
# IP literals


def _parse_ipv4_number(part: str) -> int:
    """One part of an inet_aton-style IPv4 spelling: decimal, 0x hex or 0-led octal."""
    if len(part.lstrip("0xX")) > 11:  # > 2**32 in any base; also keeps int() away from huge strings
        raise HostError(f"number {part[:20]!r}... is out of range for an IPv4 address")
    if part[:2] in ("0x", "0X"):
        if len(part) == 2:
            raise HostError(f"empty hex number {part!r} in an IPv4 address")
        return int(part[2:], 16)
    if len(part) > 1 and part[0] == "0":
        if not all(c in "01234567" for c in part):
            raise HostError(f"bad octal number {part!r} in an IPv4 address")
        return int(part, 8)
    return int(part, 10)


def _parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The WHATWG URL IPv4 parser: None if the host is not meant as an IPv4 literal.

    A host whose last label is numeric (decimal or 0x hex) is an IPv4 literal or an error,
    never a name: `127.1`, `0x7f.1`, `0177.0.0.1`, `2130706433` are all 127.0.0.1, and
    `1.2.3.4.5` or `1.2.3.256` are errors (a browser or curl would not resolve them as names).
    """
    parts = host.split(".")
    if parts and parts[-1] == "" and len(parts) > 1:
        parts.pop()
    if not parts or not _NUMERIC_PART.match(parts[-1]):
        return None
    if len(parts) > 4:
        raise HostError(f"{host!r} looks like an IPv4 address but has more than four parts")
    if not all(_NUMERIC_PART.match(p) for p in parts):
        raise HostError(f"{host!r} mixes numbers and names in an IPv4 address")
    numbers = [_parse_ipv4_number(p) for p in parts]
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise HostError(f"{host!r} is out of range for an IPv4 address")
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _parse_ipv6(text: str) -> IPAddress:
    """An IPv6 literal without brackets; a %zone (or URL-encoded %25zone) is dropped."""
    if "%" in text:
        text, _, zone = text.partition("%")
        if not zone:
            raise HostError("empty IPv6 zone id")
    try:
        addr = ipaddress.IPv6Address(text)
    except ValueError as e:
        raise HostError(f"bad IPv6 address {text!r}: {e}") from None
    mapped = addr.ipv4_mapped
    return mapped if mapped is not None else addr


@functools.lru_cache(maxsize=65536)
def parse_ip(raw: str) -> IPAddress | None:
    """The canonical address of an IP literal in any accepted spelling, or None for a name."""
    text = raw.strip()
    if len(text) > 1024:
        raise HostError("address is longer than 1024 characters")
    if text.startswith("[") or text.endswith("]"):
        if not (text.startswith("[") and text.endswith("]")):
            raise HostError(f"unbalanced brackets in {raw!r}")
        return _parse_ipv6(text[1:-1])
    if ":" in text:
        if not set(text.partition("%")[0]) <= _IPV6_CHARS:
            raise HostError(f"{raw!r} is not a host name or IP address (a port does not belong here)")
        return _parse_ipv6(text)
    return _parse_ipv4(text)


# ---------------------------------------------------------------------------------------------
# Names


def _normalize_name(text: str) -> str:
    """Lower case, trailing dot dropped, IDNA A-label (punycode) form; raises HostError."""
    if not text.isascii():
        text = text.translate(_UNICODE_DOTS)
        try:
            text = idna.uts46_remap(text, std3_rules=False, transitional=False)
        except idna.IDNAError as e:
            raise HostError(f"bad international name: {e}") from None
    text = text.lower()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise HostError("empty host")
    if len(text) > 253:
        raise HostError("host name longer than 253 characters")
    labels = text.split(".")
    out = []
    for label in labels:
        if not label:
            raise HostError(f"empty label in {text!r}")
        if label.isascii() and not label.startswith("xn--"):
            if not _ASCII_LABEL.match(label):
                raise HostError(f"bad label {label!r}: use letters, digits, '-' (not at the ends) and '_'")
            out.append(label)
            continue
        try:
            alabel = idna.alabel(label).decode("ascii") if not label.isascii() else label
            idna.ulabel(alabel)  # round-trip checks a punycode label is well formed
        except (idna.IDNAError, UnicodeError) as e:
            raise HostError(f"bad international label {label!r}: {e}") from None
        except (OverflowError, MemoryError, RecursionError) as e:
            # CPython's punycode decoder overflows on some labels (xn--...0000000000000001siie).
            raise HostError(f"bad international label {label!r}: {type(e).__name__}") from None
        out.append(alabel)
    result = ".".join(out)
    if len(result) > 253:
        raise HostError("host name longer than 253 characters")
    return result


@functools.lru_cache(maxsize=65536)
def normalize_host(raw: str) -> str:
    """The one comparable form of a host: canonical IP text, or a lower-case IDNA name.

    IP literals come first, in every spelling (decimal, hex, octal, short forms, brackets,
    IPv6 zone ids, IPv4-mapped IPv6 becomes IPv4); IPv6 is returned without brackets.
    Names: lower case, one trailing dot dropped, unicode dots mapped, UTS 46 + punycode.
    Raises HostError (a ValueError) with a message for anything unusable.
    """
    if not isinstance(raw, str):
        raise HostError("host must be a string")
    if len(raw) > 1024:
        raise HostError("host is longer than 1024 characters")
    if not raw or raw != raw.strip():
        raise HostError("empty host" if not raw.strip() else "host has surrounding spaces")
    if any(c in raw for c in "/@\\?# \t\r\n"):
        raise HostError(f"{raw!r} is not a host name (contains '/', '@', '?', '#', a space or similar)")
    text = raw.translate(_UNICODE_DOTS) if not raw.isascii() else raw
    addr = parse_ip(text)
    if addr is not None:
        return str(addr)
    if text.isascii() and not set(text.lower()) <= _ASCII_HOST_CHARS:
        raise HostError(f"{raw!r} contains characters not allowed in a host name")
    name = _normalize_name(text)
    # A unicode spelling may map to digits only after UTS 46 (e.g. fullwidth digits): re-check.
    if parse_ip(name) is not None:
        return str(parse_ip(name))
    return name


def is_ip(host: str) -> bool:
    """True when a normalised host is an IP literal."""
    if not host:
        return False
    if ":" in host:
        return True
    return host[-1].isdigit() and _parse_ipv4_quiet(host)


def _parse_ipv4_quiet(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=65536)
def registered_domain(host: str) -> str | None:
    """The registrable domain (private PSL section on) of a normalised name; None for IP literals.

    As the PSL algorithm prescribes, a name under no listed suffix falls to the default rule `*`:
    its last label is the public suffix, so `api.build.corp` -> `build.corp`, `x.corp.internal` ->
    `corp.internal`, `foo.test` -> `foo.test`. A name that is itself a public suffix (`com`, `co.uk`,
    `github.io`, any single label such as `localhost`) has no registrable domain: None.
    """
    if not host or is_ip(host):
        return None
    r = _PSL.extract_str(host)
    if r.suffix:
        return f"{r.domain}.{r.suffix}" if r.domain else None
    head, dot, last = host.rpartition(".")
    if not dot or not head:
        return None
    return f"{head.rpartition('.')[2]}.{last}"


# ---------------------------------------------------------------------------------------------
# Host patterns (rule `hosts:` entries)

PatternKind = Literal["exact", "below", "apex_below", "ip", "cidr"]


@dataclass(frozen=True, slots=True)
class HostPattern:
    """One compiled `hosts:` entry. `value` is the normalised name, or the network for ip/cidr."""

    kind: PatternKind
    value: str
    network: IPNetwork | None = None

    def __str__(self) -> str:
        if self.kind == "below":
            return f"*.{self.value}"
        if self.kind == "apex_below":
            return f"**.{self.value}"
        return self.value


def _to_v4_if_mapped(net: IPNetwork) -> IPNetwork:
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.network_address.ipv4_mapped:
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def parse_pattern(raw: str, *, deny: bool = False) -> HostPattern:
    """Compile a `hosts:` entry: a name, `*.name`, `**.name`, an IP literal or a CIDR.

    No other wildcard exists; a wildcard directly over a public suffix is an error. With
    `deny`, a wildcard over a PSL *private-section* suffix (`**.ngrok.io`, `*.github.io`) is
    accepted: denying every tenant of a hosting service can only narrow access.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise HostError("empty host entry")
    text = raw.strip()
    if "://" in text:
        raise HostError(f"{raw!r} is a URL; a host entry is a name, `*.name`, `**.name`, an IP or a CIDR")
    if "/" in text:
        addr_text, _, bits = text.partition("/")
        addr = parse_ip(addr_text)
        if addr is None or not bits.isdigit():
            raise HostError(f"bad CIDR {raw!r}: use address/prefix, e.g. 10.20.0.0/16")
        if ":" in addr_text and isinstance(addr, ipaddress.IPv4Address):
            if int(bits) < 96:  # an IPv4-mapped prefix shorter than the mapping itself
                raise HostError(f"bad CIDR {raw!r}: an IPv4-mapped prefix needs /96 or longer")
            bits = str(int(bits) - 96)
        try:
            net: IPNetwork = ipaddress.ip_network(f"{addr}/{int(bits)}", strict=True)
        except ValueError as e:
            raise HostError(f"bad CIDR {raw!r}: {e}") from None
        net = _to_v4_if_mapped(net)
        return HostPattern("cidr", str(net), net)
    kind: PatternKind = "exact"
    base = text
    if text.startswith("**."):
        kind, base = "apex_below", text[3:]
    elif text.startswith("*."):
        kind, base = "below", text[2:]
    if _PLAIN_NAME.fullmatch(base) and len(base) <= 253 and "xn--" not in base:
        name = base  # normalize_host(base), as tests/policy/test_hosts.py checks
    else:
        if "*" in base:
            raise HostError(f"bad wildcard {raw!r}: only a leading '*.' or '**.' is allowed "
                            "(e.g. *.example.com)")
        try:
            addr = parse_ip(base)
        except HostError:
            if kind != "exact":
                raise HostError(f"bad wildcard {raw!r}: a wildcard must stand over a name") from None
            raise
        if addr is not None:
            if kind != "exact":
                raise HostError(f"bad wildcard {raw!r}: a wildcard cannot stand over an IP address")
            return HostPattern("ip", str(addr), _to_v4_if_mapped(ipaddress.ip_network(addr)))
        try:
            name = normalize_host(base)
        except HostError as e:
            raise HostError(f"bad host {raw!r}: {e}") from None
    section = public_suffix_section(name) if kind != "exact" else None
    if section == "icann" or (section == "private" and not deny):
        raise HostError(f"wildcard {raw!r} stands directly over the public suffix {name!r} "
                        f"({'any tenant of a hosting service' if section == 'private' else 'any site'}); "
                        f"name the domains you mean (e.g. **.example.{name})")
    return HostPattern(kind, name)
