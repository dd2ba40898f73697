"""Where a request may go: URL parsing, host matching, resolution and address checks.

The proxy parses a URL once (with httpx, the parser that also sends it), checks the host,
resolves it ITSELF through a `Resolver`, checks every address, and pins the connection to
the address it checked (see `transport.py`): no second DNS lookup, no rebinding window.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Protocol

import anyio
import httpx

from corral.errors import InvalidArgument, PolicyDenied, Timeout, Unavailable
from corral.vault.policy import Credential, host_matches, normalize_host

__all__ = [
    "Resolver",
    "StaticResolver",
    "SystemResolver",
    "Target",
    "check_address",
    "has_ctl",
    "parse_target",
    "resolve_checked",
]

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
# Cloud metadata endpoints: refused even when a policy allows private addresses.
METADATA = {
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
}


def has_ctl(text: str) -> bool:
    """CR, LF, NUL or any other control character: never allowed where it could reach a header."""
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


@dataclass(frozen=True)
class Target:
    url: httpx.URL
    scheme: str
    host: str  # normalised: punycode, lower case, no trailing dot, IPs canonical
    port: int
    path: str
    ip_literal: IP | None
    pin_host: str  # the host exactly as the transport will see it (key of the pinned address)


def parse_target(raw: str) -> Target:
    if has_ctl(raw) or " " in raw:
        raise InvalidArgument("the URL contains CR, LF, a space or another control character")
    try:
        url = httpx.URL(raw)
    except httpx.InvalidURL as err:
        raise InvalidArgument(f"invalid URL: {err}") from None
    if url.scheme not in ("http", "https"):
        raise InvalidArgument(f"scheme {url.scheme or '(none)'!r} is not http or https")
    if url.userinfo:  # http://allowed@evil: the host is `evil`; refuse the confusion outright
        raise InvalidArgument("URLs with user info (user@host) are refused; credentials come from the vault")
    try:
        host = normalize_host(url.raw_host.decode("ascii"))
    except ValueError as err:
        raise InvalidArgument(str(err)) from None
    try:
        literal: IP | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    port = url.port or (443 if url.scheme == "https" else 80)
    pin_host = url.raw_host.decode("ascii").lower().rstrip(".")
    return Target(url.copy_with(fragment=None), url.scheme, host, port, url.path, literal, pin_host)


def check_policy(cred: Credential, target: Target, method: str) -> None:
    if not host_matches(target.host, cred.hosts):
        raise PolicyDenied(
            f"credential {cred.name!r} is not allowed for host {target.host!r}",
            hint=f"allowed hosts: {', '.join(cred.hosts)}",
        )
    if target.scheme not in cred.schemes:
        raise PolicyDenied(
            f"credential {cred.name!r} is not allowed over {target.scheme}",
            hint=f"allowed schemes: {', '.join(cred.schemes)}",
        )
    if target.port not in cred.ports:
        raise PolicyDenied(
            f"credential {cred.name!r} is not allowed on port {target.port}",
            hint=f"allowed ports: {', '.join(map(str, cred.ports))}",
        )
    if method not in cred.methods:
        raise PolicyDenied(
            f"credential {cred.name!r} does not allow method {method}",
            hint=f"allowed methods: {', '.join(cred.methods)}",
        )


# IPv6 ranges that are never the public internet, whatever `is_global` says (Python 3.11 calls
# some of them global): the IPv4-compatible ::/96 (deprecated), SIIT ::ffff:0:0:0/96, local-use
# NAT64 64:ff9b:1::/48 (RFC 8215) and the deprecated site-local fec0::/10.
NOT_GLOBAL_V6 = tuple(ipaddress.IPv6Network(n) for n in ("::/96", "::ffff:0:0:0/96", "64:ff9b:1::/48", "fec0::/10"))
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def _rfc6052(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 address at every position RFC 6052 allows (prefix /32 ... /96; bits 64-71 are skipped)."""
    raw = ip.packed
    out = []
    for prefix in (32, 40, 48, 56, 64, 96):
        start = prefix // 8
        octets = [raw[i] for i in range(start, 16) if i != 8][:4] if prefix < 96 else list(raw[12:16])
        out.append(ipaddress.IPv4Address(bytes(octets)))
    return out


def _embedded_v4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 hidden in IPv6: mapped ::ffff:a.b.c.d, SIIT ::ffff:0:a.b.c.d, compatible ::a.b.c.d,
    6to4, Teredo and NAT64 64:ff9b::/96. (Local-use NAT64 is never global; see `check_address`.)"""
    if ip.ipv4_mapped:
        return [ip.ipv4_mapped]
    if ip.sixtofour:
        return [ip.sixtofour]
    if ip.teredo:
        return [ip.teredo[1]]
    if ip in _NAT64 or ip in NOT_GLOBAL_V6[0] or ip in NOT_GLOBAL_V6[1]:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    return []


def _is_global(addr: IP) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and any(addr in net for net in NOT_GLOBAL_V6):
        return False
    return addr.is_global


def check_address(ip: IP, allow_private: bool) -> None:
    """Refuse what must never be reached; `allow_private` opens loopback/private/link-local only."""
    addresses: list[IP] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        addresses += _embedded_v4(ip)
        # The operator picks where local-use NAT64 puts the IPv4 address: try every position.
        if ip in _NAT64_LOCAL and any(v4 in METADATA for v4 in _rfc6052(ip)):
            raise PolicyDenied(
                f"address {ip} embeds a cloud metadata endpoint; it is never reachable through the proxy"
            )
    for addr in addresses:
        if addr in METADATA:
            raise PolicyDenied(f"address {ip} is a cloud metadata endpoint; it is never reachable through the proxy")
        if addr.is_unspecified or addr.is_multicast:
            raise PolicyDenied(f"address {ip} is unspecified or multicast")
        if not _is_global(addr) and not allow_private:
            raise PolicyDenied(
                f"address {ip} is loopback, private, link-local or reserved",
                hint="the credential's policy does not allow private addresses (corral vault set --allow-private)",
            )


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[str]: ...


class SystemResolver:
    """getaddrinfo in a worker thread with a deadline (a stuck resolver must not hang a request)."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s

    async def resolve(self, host: str, port: int) -> list[str]:
        try:
            with anyio.fail_after(self.timeout_s):
                infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise Timeout(f"resolving {host!r} took more than {self.timeout_s:g}s") from None
        except socket.gaierror as err:
            raise Unavailable(f"cannot resolve {host!r}: {err.strerror}") from None
        return list(dict.fromkeys(str(info[4][0]) for info in infos))


class StaticResolver:
    """A resolver answering from a table: what tests use so no DNS query ever leaves."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    async def resolve(self, host: str, port: int) -> list[str]:
        if host not in self.table:
            raise Unavailable(f"cannot resolve {host!r}: not in the static table")
        return self.table[host]


async def resolve_checked(target: Target, resolver: Resolver, allow_private: bool) -> str:
    """The address to connect to. Every address the name has must pass: one bad record refuses it."""
    if target.ip_literal is not None:
        check_address(target.ip_literal, allow_private)
        return str(target.ip_literal)
    answers = await resolver.resolve(target.host, target.port)
    if not answers:
        raise Unavailable(f"{target.host!r} has no address")
    for answer in answers:
        try:
            ip = ipaddress.ip_address(answer.split("%", 1)[0])
        except ValueError:
            raise Unavailable(f"resolver returned a non-address for {target.host!r}") from None
        try:
            check_address(ip, allow_private)
        except PolicyDenied as err:
            raise PolicyDenied(f"{target.host!r} resolves to {ip}: {err.message}", hint=err.hint) from None
    return answers[0].split("%", 1)[0]
