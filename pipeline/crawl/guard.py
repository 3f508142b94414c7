"""SSRF guard: refuse hosts that resolve to private, loopback, link-local, multicast, reserved or cloud
metadata addresses, unless an explicitly allowed network contains them. Checked for every hop of a
redirect chain, on the addresses the connection will actually use (no second DNS lookup to rebind)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Addresses no public image host has; most are also covered by the is_* checks below.
_ALWAYS_BLOCKED = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
        "::1/128", "fc00::/7", "fe80::/10", "ff00::/8", "fd00:ec2::254/128",
    )
)  # fmt: skip


class BlockedAddress(Exception):
    """The host resolves to an address the guard does not allow."""


class ResolveError(Exception):
    """The host name could not be resolved."""


def _unmap(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def is_public(ip: IPAddress) -> bool:
    ip = _unmap(ip)
    if any(ip in net for net in _ALWAYS_BLOCKED if net.version == ip.version):
        return False
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
                or ip.is_unspecified)  # fmt: skip


@dataclass(frozen=True)
class NetworkGuard:
    """Which addresses may be fetched from: public ones, plus the ``allow`` networks."""

    allow: tuple[IPNetwork, ...] = field(default_factory=tuple)
    enabled: bool = True

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str], enabled: bool = True) -> NetworkGuard:
        return cls(tuple(ipaddress.ip_network(c, strict=False) for c in cidrs), enabled)

    def allowed(self, ip: IPAddress) -> bool:
        if not self.enabled:
            return True
        ip = _unmap(ip)
        return is_public(ip) or any(ip in net for net in self.allow if net.version == ip.version)

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        """The host's addresses, all of them allowed; raises BlockedAddress or ResolveError."""
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
            addresses: list[IPAddress] = [literal]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as exc:
                raise ResolveError(f"cannot resolve {host}: {exc}") from None
            addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        blocked = [a for a in addresses if not self.allowed(a)]
        if blocked:  # one bad address is enough: a resolver may hand out either
            raise BlockedAddress(f"{host} resolves to {blocked[0]}, a non-public address")
        return addresses
