"""A credential's policy: plain, non-secret config kept beside the secret.

It says how the secret is injected (`kind`) and where it may go (hosts, methods, ports,
schemes, private addresses). Hosts are stored normalised (lower-case ASCII/punycode,
no trailing dot) so that matching compares exactly what the proxy connects to.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["KINDS", "Credential", "Kind", "host_matches", "normalize_host", "normalize_host_pattern"]

Kind = Literal["bearer", "header", "basic", "query", "git"]
Scheme = Literal["http", "https"]
KINDS: tuple[str, ...] = get_args(Kind)
TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token: header names, methods
LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def normalize_host(host: str) -> str:
    """A host as the proxy compares it: IDNA/punycode, lower case, no trailing dot, IPs canonical.

    Raises ValueError for anything that is not a plain DNS name or IP literal (percent
    escapes, userinfo, zone ids, empty labels): better refused than parsed two ways.
    """
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if "%" in host:  # percent escapes and IPv6 zone ids: refused rather than parsed two ways
        raise ValueError(f"invalid host name {host!r}")
    if ":" in host:  # IPv6 literal
        return str(ipaddress.IPv6Address(host))
    try:
        ascii_host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError as err:
        raise ValueError(f"invalid host name {host!r}") from err
    ascii_host = ascii_host.lower()
    ascii_host = ascii_host.removesuffix(".")
    ipv4 = legacy_ipv4(ascii_host)
    if ipv4 is not None:
        return ipv4
    labels = ascii_host.split(".")
    if not ascii_host or len(ascii_host) > 253 or not all(LABEL.match(label) for label in labels):
        raise ValueError(f"invalid host name {host!r}")
    return ascii_host


def legacy_ipv4(host: str) -> str | None:
    """Canonical dotted quad for every spelling inet_aton accepts (2852039166, 0xa9.0376.43518, ...).

    Those spellings are why the proxy never hands a raw host to getaddrinfo: it would
    quietly turn `http://2852039166/` into 169.254.169.254.
    """
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(re.fullmatch(r"0x[0-9a-f]*|0[0-7]*|[1-9][0-9]*", p) for p in parts):
        return None
    try:
        values = [
            int(p, 16) if p.startswith("0x") else int(p, 8) if p.startswith("0") and len(p) > 1 else int(p or "0")
            for p in parts
        ]
    except ValueError:
        return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(values)):
        raise ValueError(f"invalid IPv4 address {host!r}")
    number = 0
    for v in head:
        number = number * 256 + v
    number = number * 256 ** (5 - len(values)) + last
    return str(ipaddress.IPv4Address(number))


def normalize_host_pattern(pattern: str) -> str:
    """`example.com` or `*.example.com` (any depth of subdomain, not the apex)."""
    if pattern.startswith("*."):
        return "*." + normalize_host(pattern[2:])
    if "*" in pattern:
        raise ValueError(f"host pattern {pattern!r}: only a leading '*.' wildcard is supported")
    return normalize_host(pattern)


def host_matches(host: str, patterns: list[str]) -> bool:
    """`host` must already be normalised; patterns are (they are validated on the way in)."""
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


class Credential(BaseModel):
    """A named credential's policy. The secret itself is never a field here."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Kind = "bearer"
    hosts: list[str] = Field(min_length=1)
    methods: list[str] = Field(default_factory=list)
    ports: list[int] = Field(default_factory=list)
    schemes: list[Scheme] = Field(default_factory=lambda: list[Scheme](["https"]))
    allow_private: bool = False
    header: str | None = None  # kind=header: the header name
    template: str = "{secret}"  # kind=header: the value, e.g. "token {secret}"
    query_param: str | None = None  # kind=query
    username: str | None = None  # kind=basic/git
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError("credential names are 1-64 of A-Z a-z 0-9 _ . - and start with a letter or digit")
        return v

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        return sorted({normalize_host_pattern(h) for h in v})

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        out = sorted({m.upper() for m in v})
        if any(not TOKEN.match(m) for m in out):
            raise ValueError("methods are HTTP tokens like GET or POST")
        return out

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        if any(not 0 < p < 65536 for p in v):
            raise ValueError("ports are 1-65535")
        return sorted(set(v))

    @model_validator(mode="after")
    def _kind_fields(self) -> Credential:
        if not self.methods:
            self.methods = ["GET", "POST"] if self.kind == "git" else ["GET", "HEAD"]
        if not self.ports:
            self.ports = sorted({443 if s == "https" else 80 for s in self.schemes})
        if self.kind == "header":
            if not self.header or not TOKEN.match(self.header):
                raise ValueError("kind 'header' needs --header NAME (an HTTP header name)")
            if "{secret}" not in self.template or any(c in self.template for c in "\r\n\0"):
                raise ValueError("the header template must contain {secret} and no CR/LF")
        if self.kind == "query" and not (self.query_param and TOKEN.match(self.query_param)):
            raise ValueError("kind 'query' needs --query-param NAME")
        if self.kind in ("basic", "git") and self.username is None:
            self.username = "x-access-token" if self.kind == "git" else ""
        if self.username and (":" in self.username or any(c in self.username for c in "\r\n\0")):
            raise ValueError("the username may not contain ':' or CR/LF")
        return self

    def injected_header(self) -> str | None:
        """The header the proxy sets (and strips from the client's), if any."""
        if self.kind in ("bearer", "basic", "git"):
            return "authorization"
        if self.kind == "header":
            return (self.header or "").lower()
        return None

    def public(self) -> dict:
        """What list_credentials shows: everything but secrets (there are none here)."""
        return self.model_dump(exclude_none=True)
