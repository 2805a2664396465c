"""Private-address guard for the downloader: never fetch into our own network.

URLs come from strangers (LAION metadata). Fetching them from inside a cluster must not become a
way to reach cloud metadata endpoints (169.254.169.254), internal services or the host itself. Two
parts:

* `is_blocked(host_or_ip, allowed_networks)` - the pure decision: is this address (in any spelling a
  resolver accepts: `2130706433`, `0x7f000001`, `017700000001`, `127.1`, `[::ffff:10.0.0.1]`, a
  URL, or a host name, which is resolved without connecting) one we refuse to connect to?
* `GuardPolicy.opener()` - the enforcement: a urllib opener whose HTTP(S) connections resolve the
  host once, check every resolved address and connect to exactly the address that was checked (so
  a DNS answer that changes between check and connect - "DNS rebinding" - cannot slip through).
  Redirects go through the same opener, so every hop is checked. Only http/https are handled
  (no file://, ftp://, data:), environment proxies are ignored (through a proxy the address
  connected to would be the proxy's, so the guard could not see the real target), and responses
  are capped in size and total read time.

Blocked connections raise `BlockedAddressError` whose message starts with `blocked_address`, which
is how the download phase counts them.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import ipaddress
import re
import socket
import time
import urllib.parse
import urllib.request
from typing import Iterable, Optional, Sequence, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

BLOCKED_REASON = "blocked_address"
TOO_LARGE_REASON = "response_too_large"

_SHARED_ADDRESS_SPACE = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT, RFC 6598
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: last 32 bits are an IPv4 address
_METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


class BlockedAddressError(OSError):
    """A connection was refused by the guard (message starts with `blocked_address`)."""


class ResponseTooLargeError(OSError):
    """A response body exceeded the configured size (message starts with `response_too_large`)."""


class DownloadDeadlineError(TimeoutError):
    """Reading a response body took longer than the configured total time (message says `timed out`)."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Outcome of a guard decision; truthy when the address is blocked."""

    blocked: bool
    reason: str
    addresses: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.blocked


# --------------------------------------------------------------------------------------------
# Parsing: every spelling of an address the way a resolver (glibc inet_aton / WHATWG URL) reads it


def parse_networks(networks: Iterable[str], what: str = "allowed_networks") -> tuple[IPNetwork, ...]:
    """CIDR strings -> networks; a bad entry raises ValueError naming it."""
    out = []
    for i, text in enumerate(networks):
        try:
            out.append(ipaddress.ip_network(str(text).strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{what}[{i}]: {text!r} is not a CIDR network ({exc})") from None
    return tuple(out)


def _parse_ipv4_part(part: str) -> Optional[int]:
    if part[:2] in ("0x", "0X"):
        digits, base = part[2:], 16
        if digits == "":
            return 0
    elif len(part) > 1 and part[0] == "0":
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    if not digits or not re.fullmatch(r"[0-9a-fA-F]+", digits):
        return None
    try:
        return int(digits, base)
    except ValueError:  # e.g. '9' in an octal part
        return None


def parse_ipv4_literal(host: str) -> Optional[ipaddress.IPv4Address]:
    """IPv4 in any legacy spelling (1-4 dot-separated parts, each decimal, 0-octal or 0x-hex, as
    inet_aton and browsers accept), or None when `host` is not such a literal."""
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":  # one trailing dot (FQDN form) is allowed
        parts = parts[:-1]
    if not 1 <= len(parts) <= 4:
        return None
    numbers = [_parse_ipv4_part(p) for p in parts]
    if any(n is None for n in numbers):
        return None
    *leading, last = numbers
    if any(n > 255 for n in leading) or last >= 256 ** (5 - len(parts)):
        raise ValueError(f"{host!r}: numeric host out of range for an IPv4 address")
    value = last
    for i, n in enumerate(leading):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def parse_ip_literal(host: str) -> Optional[IPAddress]:
    """An IP address written in any accepted spelling, or None for a host name."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        text = text.split("%", 1)[0]  # zone id (fe80::1%eth0) does not change the address class
        return ipaddress.IPv6Address(text)
    return parse_ipv4_literal(text)


def host_of(url_or_host: str) -> str:
    """The host part of a URL (`http://[::1]:8080/x` -> `::1`), or the input when it is not a URL."""
    text = url_or_host.strip()
    if "://" in text:
        parsed = urllib.parse.urlsplit(text)
        if parsed.hostname is None:
            raise ValueError(f"{url_or_host!r}: URL has no host")
        return parsed.hostname
    return text


def effective_address(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address really reaches (IPv4-mapped, NAT64, 6to4), else itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64_WELL_KNOWN:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


# --------------------------------------------------------------------------------------------
# The decision


def address_class(ip: IPAddress) -> Optional[str]:
    """Why an address is not publicly routable ('loopback', 'private', ...), or None when it is."""
    if ip in _METADATA_ADDRESSES:
        return "cloud metadata endpoint (link-local)"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED_ADDRESS_SPACE:
        return "shared address space (carrier-grade NAT)"
    if ip.is_reserved:  # before is_private, which also covers 240.0.0.0/4 in newer Pythons
        return "reserved"
    if ip.is_private:
        return "private"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    if not ip.is_global:
        return "not globally routable"
    return None


@dataclasses.dataclass(frozen=True)
class GuardPolicy:
    """Which addresses may be connected to: public ones, plus `allowed_networks`, minus
    `denied_networks`. Picklable, so it travels to download workers."""

    allowed_networks: tuple[str, ...] = ()
    denied_networks: tuple[str, ...] = ()
    max_response_bytes: int = 50 * 2**20
    max_response_seconds: float = 120.0

    def __post_init__(self):
        object.__setattr__(self, "allowed_networks", tuple(self.allowed_networks))
        object.__setattr__(self, "denied_networks", tuple(self.denied_networks))
        object.__setattr__(self, "_allowed", parse_networks(self.allowed_networks, "allowed_networks"))
        object.__setattr__(self, "_denied", parse_networks(self.denied_networks, "denied_networks"))

    def __reduce__(self):
        return (GuardPolicy, (self.allowed_networks, self.denied_networks, self.max_response_bytes,
                              self.max_response_seconds))

    def check_ip(self, ip: IPAddress | str) -> Verdict:
        """Decide for one numeric address (as a resolver returned it)."""
        if isinstance(ip, str):
            ip = parse_ip_literal(ip)
            if ip is None:
                raise ValueError("check_ip needs a numeric address")
        target = effective_address(ip)
        shown = str(ip) if target == ip else f"{ip} (= {target})"
        candidates = {ip, target}
        if any(c.version == net.version and c in net for c in candidates for net in self._denied):
            return Verdict(True, f"{BLOCKED_REASON}: {shown} is in denied_networks", (str(ip),))
        if any(c.version == net.version and c in net for c in candidates for net in self._allowed):
            return Verdict(False, f"{shown} is in allowed_networks", (str(ip),))
        # An IPv4-mapped / NAT64 / 6to4 address is judged by the IPv4 host it actually reaches.
        why = address_class(target)
        if why:
            return Verdict(True, f"{BLOCKED_REASON}: {shown} is {why}", (str(ip),))
        return Verdict(False, f"{shown} is public", (str(ip),))

    def check(self, url_or_host: str) -> Verdict:
        """Decide for a URL, an address in any spelling, or a host name (resolved, not connected).
        A name is blocked when any of its addresses is; an unresolvable name is blocked too."""
        try:
            host = host_of(url_or_host)
            ip = parse_ip_literal(host)
        except ValueError as exc:
            return Verdict(True, f"{BLOCKED_REASON}: invalid host ({exc})")
        if ip is not None:
            return self.check_ip(ip)
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            return Verdict(True, f"{BLOCKED_REASON}: {host!r} does not resolve ({exc})")
        verdicts = [self.check_ip(_sockaddr_ip(info[4])) for info in infos]
        addresses = tuple(dict.fromkeys(a for v in verdicts for a in v.addresses))
        blocked = [v.reason for v in verdicts if v.blocked]
        if blocked:
            return Verdict(True, f"{BLOCKED_REASON}: {host} resolves to " + "; ".join(dict.fromkeys(
                r.removeprefix(BLOCKED_REASON + ": ") for r in blocked)), addresses)
        return Verdict(False, f"{host} resolves to public or allowed addresses only", addresses)

    # ----------------------------------------------------------------------------------------
    # Enforcement

    def create_connection(self, address: tuple[str, int], timeout=socket._GLOBAL_DEFAULT_TIMEOUT,
                          source_address=None, *, all_errors: bool = False) -> socket.socket:
        """`socket.create_connection` that refuses blocked addresses: resolve once, check each
        resolved address, connect to exactly the checked one."""
        host, port = address
        refusals: list[str] = []
        last_error: Optional[OSError] = None
        for family, type_, proto, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            verdict = self.check_ip(_sockaddr_ip(sockaddr))
            if verdict.blocked:
                refusals.append(verdict.reason.removeprefix(BLOCKED_REASON + ": "))
                continue
            sock = socket.socket(family, type_, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                last_error = exc
                sock.close()
        if last_error is not None:
            raise last_error
        raise BlockedAddressError(f"{BLOCKED_REASON}: refusing to connect to {host}: " + "; ".join(refusals))

    def opener(self) -> urllib.request.OpenerDirector:
        """A urllib opener for http/https only, every connection (redirects included) guarded."""
        director = urllib.request.OpenerDirector()
        for handler in (urllib.request.ProxyHandler({}),  # no proxies: see module docstring
                        urllib.request.UnknownHandler(),
                        _GuardedHTTPHandler(self),
                        _GuardedHTTPSHandler(self),
                        urllib.request.HTTPDefaultErrorHandler(),
                        urllib.request.HTTPRedirectHandler(),
                        urllib.request.HTTPErrorProcessor()):
            director.add_handler(handler)
        return director


def _sockaddr_ip(sockaddr) -> IPAddress:
    return ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])


def is_blocked(ip_or_host_address: str, allowed_networks: Sequence[str] = (),
               denied_networks: Sequence[str] = ()) -> Verdict:
    """Pure decision for one URL / address / host name; truthy Verdict = refused (see GuardPolicy.check)."""
    return GuardPolicy(tuple(allowed_networks), tuple(denied_networks)).check(ip_or_host_address)


# --------------------------------------------------------------------------------------------
# http.client / urllib plumbing


class _LimitedHTTPResponse(http.client.HTTPResponse):
    """Caps the body size and the total time spent reading it (a slow-drip server otherwise holds
    a download thread as long as it sends a byte per socket timeout)."""

    def __init__(self, sock, *args, max_bytes: int, max_seconds: float, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self._max_bytes = max_bytes
        self._deadline = time.monotonic() + max_seconds
        self._max_seconds = max_seconds
        self._received = 0

    def _account(self, n: int) -> None:
        self._received += n
        if self._received > self._max_bytes:
            raise ResponseTooLargeError(f"{TOO_LARGE_REASON}: body exceeds {self._max_bytes} bytes")
        if time.monotonic() > self._deadline:
            raise DownloadDeadlineError(f"timed out: body not received within {self._max_seconds:g} s")

    def read(self, amt=None):
        if amt is not None:
            data = super().read(amt)
            self._account(len(data))
            return data
        if self.length is not None and self.length > self._max_bytes:
            raise ResponseTooLargeError(
                f"{TOO_LARGE_REASON}: Content-Length {self.length} exceeds {self._max_bytes} bytes")
        chunks = []
        while True:
            chunk = super().read(1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            self._account(len(chunk))


def _guard_connection(conn: http.client.HTTPConnection, policy: GuardPolicy) -> None:
    # HTTPConnection.connect() (and HTTPSConnection.connect(), before wrapping TLS) opens its socket
    # through self._create_connection; replacing it is the documented-by-source hook.
    conn._create_connection = policy.create_connection
    conn.response_class = functools.partial(_LimitedHTTPResponse, max_bytes=policy.max_response_bytes,
                                            max_seconds=policy.max_response_seconds)


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, policy: GuardPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        _guard_connection(self, policy)


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, policy: GuardPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        _guard_connection(self, policy)


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: GuardPolicy):
        super().__init__()
        self._connection = functools.partial(_GuardedHTTPConnection, policy=policy)

    def http_open(self, req):
        return self.do_open(self._connection, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: GuardPolicy):
        super().__init__()
        self._connection = functools.partial(_GuardedHTTPSConnection, policy=policy)

    def https_open(self, req):
        kwargs = {"context": self._context}
        if self._check_hostname is not None:
            kwargs["check_hostname"] = self._check_hostname
        return self.do_open(self._connection, req, **kwargs)
