"""SSRF guard: refuse hosts that resolve to private, loopback, link-local, multicast, reserved or cloud
metadata addresses, unless an explicitly allowed network contains them. Checked for every hop of a
redirect chain, on the addresses the connection will actually use (no second DNS lookup to rebind).

Host names are put in their wire form first (``ascii_host``): IP literals as they are, names lower-cased
and IDNA-encoded (UTS #46, as browsers do), so that ``bücher.example`` is resolved, and sent in the Host
header, as ``xn--bcher-kva.example``. A host that has no such form is ``BadHost``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import idna

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


class BadHost(ResolveError):
    """The host is neither an IP literal nor a name that can be written in DNS (a malformed URL)."""


# One DNS label in its ASCII form. Underscores are not valid in host names, but DNS carries them and some
# image hosts use them; anything else (spaces, '%', control characters) never resolves.
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")


def ascii_host(host: str) -> str:
    """``host`` (as ``urlsplit(...).hostname`` gives it) in the form it is resolved and sent in: an IP
    literal unchanged, a name lower-cased and IDNA-encoded. BadHost when there is no such form."""
    if not host:
        raise BadHost("no host")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if not host.isascii() or not host.isprintable():  # an IPv6 zone id may be any text
            raise BadHost(f"{host!r}: not an address")
        return host
    if ":" in host:  # only IPv6 literals have colons, and this is none
        raise BadHost(f"{host!r}: not an IPv6 address")
    name = host
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except (UnicodeError, ValueError) as exc:
            raise BadHost(f"{host!r}: not a valid international host name ({exc})") from None
    name = name.lower()
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    if len(name) > 254 or not all(_LABEL.fullmatch(label) for label in labels):
        raise BadHost(f"{host!r}: not a valid host name")
    return name


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
    # (host, port) -> addresses; the system resolver when None. Tests map names to loopback with it.
    resolver: Callable[[str, int], Sequence[str]] | None = field(default=None, compare=False)

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str], enabled: bool = True) -> NetworkGuard:
        return cls(tuple(ipaddress.ip_network(c, strict=False) for c in cidrs), enabled)

    def allowed(self, ip: IPAddress) -> bool:
        if not self.enabled:
            return True
        ip = _unmap(ip)
        return is_public(ip) or any(ip in net for net in self.allow if net.version == ip.version)

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        """The host's addresses, all of them allowed; raises BlockedAddress, BadHost or ResolveError."""
        host = ascii_host(host.strip("[]"))
        if ":" in host or _is_ipv4(host):
            addresses: list[IPAddress] = [ipaddress.ip_address(host)]
        else:
            found = self.resolver(host, port) if self.resolver else _system_resolve(host, port)
            addresses = list(dict.fromkeys(ipaddress.ip_address(a.split("%")[0]) for a in found))
            if not addresses:
                raise ResolveError(f"cannot resolve {host}: no addresses")
        blocked = [a for a in addresses if not self.allowed(a)]
        if blocked:  # one bad address is enough: a resolver may hand out either
            raise BlockedAddress(f"{host} resolves to {blocked[0]}, a non-public address")
        return addresses


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _system_resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise ResolveError(f"cannot resolve {host}: {exc}") from None
    return [str(info[4][0]) for info in infos]
