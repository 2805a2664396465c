"""Private-address guard for the downloader: never fetch into our own network.

Longer than 500 lines: the address rules, the guarded opener, its per-host limits and the cached resolver
together, so every connection path is checked by one module.

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
  are capped in size and in time: every socket read of a response (headers included) runs with the
  socket timeout set to the time left, so a server that drips one byte per second cannot hold a
  download past `max_response_seconds` per URL (its retries and redirects included), nor past the
  shard's deadline when the opener has one.

The cloud metadata endpoints (169.254.169.254, fd00:ec2::254) stay refused even when
`allowed_networks` covers them (`["0.0.0.0/0"]` would otherwise open them silently): they need
`allow_metadata_address=True` as well, which the download phase announces with a loud warning.

Two optional hooks of the opener serve the download phase's politeness (`pipelines.download_task`):
a `CachingResolver` answers repeated lookups of a host from memory for a while (one per shard task) -
every answer, cached or fresh, still goes through `check_ip` address by address before a connection is
made; and a connection `gate` is asked for a slot before each connection is opened (a per-host limit),
which the response gives back when its body has been read or it is closed.

Blocked connections raise `BlockedAddressError` whose message starts with `blocked_address`, which
is how the download phase counts them.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import ipaddress
import re
import io
import logging
import socket
import threading
import time
import urllib.parse
import urllib.request
from typing import Callable, Iterable, Optional, Sequence, Union

log = logging.getLogger(__name__)

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
    """A URL's response (connect, headers, body; retries and redirects included) took longer than the
    configured total time, or the shard's deadline passed (message starts with `timed out`)."""


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
# Resolution, with an optional per-task cache


def _system_getaddrinfo(host: str, port: Optional[int]) -> list:
    # Looked up at call time (not bound at import), so a test's resolver stand-in is seen.
    return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)


# Lookup failures that are answers (the name has no address) and are cached like addresses; a temporary
# failure (EAI_AGAIN: the resolver did not answer) is not.
_CACHEABLE_GAI_ERRORS = frozenset(getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA", "EAI_FAIL")
                                  if hasattr(socket, name))


class CachingResolver:
    """`getaddrinfo(host, port)` answers kept for `max_age_s` seconds (0: nothing kept), shared by the threads
    of one shard task. A cache of answers only: whoever uses them still checks every address
    (`GuardPolicy.create_connection` / `check` do). getaddrinfo gives no TTLs, so the age is ours; a local
    caching resolver (unbound, dnsmasq) is what honours the records' TTLs across tasks and machines.
    `lookup(host, port)` and `clock()` are replaceable (tests: no network, no waiting)."""

    def __init__(self, max_age_s: float = 300.0, lookup: Optional[Callable[[str, Optional[int]], list]] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.max_age_s = max_age_s
        self._lookup = lookup or _system_getaddrinfo
        self._clock = clock
        self._lock = threading.Lock()
        self._answers: dict[str, tuple[float, object]] = {}
        self.hits = 0
        self.lookups = 0

    def getaddrinfo(self, host: str, port: Optional[int]) -> list:
        """getaddrinfo(host, port, 0, SOCK_STREAM), from the cache when fresh. Answers are kept per host name
        (looked up without a port) and given the port asked for."""
        return [(family, type_, proto, canonname, (sockaddr[0], port or 0, *sockaddr[2:]))
                for family, type_, proto, canonname, sockaddr in self._host_answer(host)]

    def _host_answer(self, host: str) -> list:
        key = host.lower().rstrip(".")
        now = self._clock()
        with self._lock:
            cached = self._answers.get(key)
            if cached is not None and now < cached[0]:
                self.hits += 1
                answer = cached[1]
                if isinstance(answer, BaseException):
                    raise socket.gaierror(*answer.args)
                return list(answer)
            self.lookups += 1
        try:
            answer = list(self._lookup(host, None))
        except socket.gaierror as exc:
            if self.max_age_s > 0 and exc.args and exc.args[0] in _CACHEABLE_GAI_ERRORS:
                with self._lock:
                    self._answers[key] = (now + self.max_age_s, exc)
            raise
        if self.max_age_s > 0:
            with self._lock:
                self._answers[key] = (now + self.max_age_s, tuple(answer))
        return answer


def _resolve(resolver: Optional[CachingResolver], host: str, port: Optional[int]) -> list:
    return resolver.getaddrinfo(host, port) if resolver is not None else _system_getaddrinfo(host, port)


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
    # The metadata endpoints hand out cloud credentials: allowed_networks alone never opens them.
    allow_metadata_address: bool = False

    def __post_init__(self):
        object.__setattr__(self, "allowed_networks", tuple(self.allowed_networks))
        object.__setattr__(self, "denied_networks", tuple(self.denied_networks))
        object.__setattr__(self, "_allowed", parse_networks(self.allowed_networks, "allowed_networks"))
        object.__setattr__(self, "_denied", parse_networks(self.denied_networks, "denied_networks"))

    def __reduce__(self):
        return (GuardPolicy, (self.allowed_networks, self.denied_networks, self.max_response_bytes,
                              self.max_response_seconds, self.allow_metadata_address))

    def metadata_warnings(self) -> list[str]:
        """What the operator must hear about the metadata endpoints under this policy (empty: nothing)."""
        covered = sorted(str(ip) for ip in _METADATA_ADDRESSES
                         if any(ip.version == net.version and ip in net for net in self._allowed))
        if self.allow_metadata_address:
            return [f"allow_metadata_address is true: downloads may reach the cloud metadata endpoint(s) "
                    f"{covered or '(none: allowed_networks does not cover them)'}, which hand out this "
                    f"machine's cloud credentials to whoever controls a URL in the input"]
        if covered:
            return [f"allowed_networks {list(self.allowed_networks)} covers the cloud metadata address(es) "
                    f"{covered}; they stay blocked (set allow_metadata_address: true to open them)"]
        return []

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
        if candidates & _METADATA_ADDRESSES and not self.allow_metadata_address:
            return Verdict(True, f"{BLOCKED_REASON}: {shown} is the cloud metadata endpoint (opened only by "
                                 f"allow_metadata_address, never by allowed_networks)", (str(ip),))
        if any(c.version == net.version and c in net for c in candidates for net in self._allowed):
            return Verdict(False, f"{shown} is in allowed_networks", (str(ip),))
        # An IPv4-mapped / NAT64 / 6to4 address is judged by the IPv4 host it actually reaches.
        why = address_class(target)
        if why:
            return Verdict(True, f"{BLOCKED_REASON}: {shown} is {why}", (str(ip),))
        return Verdict(False, f"{shown} is public", (str(ip),))

    def check(self, url_or_host: str, resolver: Optional[CachingResolver] = None) -> Verdict:
        """Decide for a URL, an address in any spelling, or a host name (resolved, through `resolver` when
        given, never connected). A name is blocked when any of its addresses is; an unresolvable name is
        blocked too. A cached answer is checked exactly as a fresh one."""
        try:
            host = host_of(url_or_host)
            ip = parse_ip_literal(host)
        except ValueError as exc:
            return Verdict(True, f"{BLOCKED_REASON}: invalid host ({exc})")
        if ip is not None:
            return self.check_ip(ip)
        try:
            infos = _resolve(resolver, host, None)
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
                          source_address=None, *, all_errors: bool = False,
                          resolver: Optional[CachingResolver] = None) -> socket.socket:
        """`socket.create_connection` that refuses blocked addresses: resolve once (through `resolver`
        when given), check each resolved address, connect to exactly the checked one. The check runs on
        every call, whether the answer came from the resolver's cache or not."""
        host, port = address
        refusals: list[str] = []
        last_error: Optional[OSError] = None
        for family, type_, proto, _, sockaddr in _resolve(resolver, host, port):
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

    def opener(self, shard_deadline: Optional[float] = None, *, resolver: Optional[CachingResolver] = None,
               gate: Optional["ConnectionGate"] = None) -> "_DeadlineOpener":
        """A urllib opener for http/https only, every connection (redirects included) guarded, each URL
        bounded by `max_response_seconds` and, when given, by `shard_deadline` (a `time.monotonic()`
        instant after which no request starts or reads any more). `resolver`: where host names are looked
        up (default: the system's getaddrinfo each time). `gate(host, deadline, why)`: called before each
        connection is opened (`host` is "name:port", lower case), may wait until `deadline`, returns the
        function that gives its slot back (called once, when the response is read to its end or closed,
        or when the connection fails)."""
        director = _DeadlineOpener(self.max_response_seconds, shard_deadline)
        hooks = _ConnectionHooks(self, director.current_deadline, resolver, gate)
        for handler in (urllib.request.ProxyHandler({}),  # no proxies: see module docstring
                        urllib.request.UnknownHandler(),
                        _GuardedHTTPHandler(hooks),
                        _GuardedHTTPSHandler(hooks),
                        urllib.request.HTTPDefaultErrorHandler(),
                        urllib.request.HTTPRedirectHandler(),
                        urllib.request.HTTPErrorProcessor()):
            director.add_handler(handler)
        return director


def _sockaddr_ip(sockaddr) -> IPAddress:
    return ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])


def is_blocked(ip_or_host_address: str, allowed_networks: Sequence[str] = (),
               denied_networks: Sequence[str] = (), allow_metadata_address: bool = False) -> Verdict:
    """Pure decision for one URL / address / host name; truthy Verdict = refused (see GuardPolicy.check)."""
    return GuardPolicy(tuple(allowed_networks), tuple(denied_networks),
                       allow_metadata_address=allow_metadata_address).check(ip_or_host_address)


# --------------------------------------------------------------------------------------------
# http.client / urllib plumbing

# gate(host "name:port", deadline (monotonic), why the deadline exists) -> release()
ConnectionGate = Callable[[str, float, str], Callable[[], None]]


@dataclasses.dataclass(frozen=True)
class _ConnectionHooks:
    policy: GuardPolicy
    deadline_source: Callable[[], tuple[float, str]]
    resolver: Optional[CachingResolver] = None
    gate: Optional[ConnectionGate] = None


class _DeadlineOpener(urllib.request.OpenerDirector):
    """Gives each URL one deadline, `max_seconds` from its first request, that its connections and reads
    all share: a retry of the same URL by the same thread (img2dataset retries in place) and the redirects
    it follows get what is left of it, not a fresh one. The shard's deadline, when set, caps them all."""

    def __init__(self, max_seconds: float, shard_deadline: Optional[float]):
        super().__init__()
        self._max_seconds = max_seconds
        self._shard_deadline = shard_deadline
        self._local = threading.local()

    def open(self, fullurl, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT):
        local = self._local
        depth = getattr(local, "depth", 0)
        if depth == 0:  # a redirect re-enters open() from inside the first call: same URL budget
            url = fullurl.full_url if isinstance(fullurl, urllib.request.Request) else str(fullurl)
            if getattr(local, "url", None) != url:
                local.url, local.deadline = url, time.monotonic() + self._max_seconds
        local.depth = depth + 1
        try:
            return super().open(fullurl, data, timeout)
        finally:
            local.depth = depth

    def current_deadline(self) -> tuple[float, str]:
        """(the monotonic deadline of this thread's current URL, the message when it passes)."""
        deadline = getattr(self._local, "deadline", None)
        if deadline is None:  # a connection opened outside open(): give it its own budget
            deadline = time.monotonic() + self._max_seconds
        why = f"no complete response within max_response_seconds={self._max_seconds:g} s"
        if self._shard_deadline is not None and self._shard_deadline < deadline:
            return self._shard_deadline, "the shard's max_shard_seconds had passed"
        return deadline, why


class _DeadlineReader(io.RawIOBase):
    """The raw stream under an HTTP response: every read runs with the socket timeout set to the time
    left before the deadline (and never longer than the per-read timeout the caller chose), so a
    BufferedReader's loop of small reads (a header line, a 1 MiB body read) cannot outlast it."""

    def __init__(self, raw, sock, deadline: float, why: str):
        super().__init__()
        self._raw, self._sock, self._deadline, self._why = raw, sock, deadline, why
        self._per_read = sock.gettimeout()

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def readinto(self, buffer) -> Optional[int]:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise DownloadDeadlineError(f"timed out: {self._why}")
        self._sock.settimeout(left if self._per_read is None else min(self._per_read, left))
        try:
            return self._raw.readinto(buffer)
        except socket.timeout:
            if time.monotonic() >= self._deadline:
                raise DownloadDeadlineError(f"timed out: {self._why}") from None
            raise

    def close(self) -> None:
        if not self.closed:
            self._raw.close()  # the SocketIO: releases its reference on the socket
        super().close()


class _LimitedHTTPResponse(http.client.HTTPResponse):
    """Caps the body size, and bounds every read (status line, headers, body) by the URL's deadline.
    Holds the connection's gate slot once the connection hands it over, and gives it back when the body
    has been read to its end or the response is closed, whichever comes first."""

    def __init__(self, sock, *args, max_bytes: int, deadline: float, why: str, **kwargs):
        super().__init__(sock, *args, **kwargs)
        # Re-wrap the SocketIO that HTTPResponse made: detach() hands it over without closing it.
        self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, deadline, why))
        self._max_bytes = max_bytes
        self._received = 0
        self._release_slot: Optional[Callable[[], None]] = None

    def _give_back_slot(self) -> None:
        release, self._release_slot = self._release_slot, None
        if release is not None:
            release()

    def _close_conn(self):  # the body's end (or an error): the connection is done with
        try:
            super()._close_conn()
        finally:
            self._give_back_slot()

    def close(self):
        try:
            super().close()
        finally:
            self._give_back_slot()

    def _account(self, n: int) -> None:
        self._received += n
        if self._received > self._max_bytes:
            raise ResponseTooLargeError(f"{TOO_LARGE_REASON}: body exceeds {self._max_bytes} bytes")

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
            chunk = super().read(1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            self._account(len(chunk))


class _DeadlineConnectionMixin:
    """Connects through the guard (and the gate, when there is one), with the connect timeout cut to the
    time the URL has left, and binds the URL's deadline to the response it will read."""

    def _setup_guard(self, hooks: _ConnectionHooks) -> None:
        # HTTPConnection.connect() (and HTTPSConnection.connect(), before wrapping TLS) opens its socket
        # through self._create_connection; replacing it is the documented-by-source hook.
        self._create_connection = functools.partial(hooks.policy.create_connection, resolver=hooks.resolver)
        self._hooks = hooks
        self._release_slot: Optional[Callable[[], None]] = None

    def _give_back_slot(self) -> None:
        release, self._release_slot = getattr(self, "_release_slot", None), None
        if release is not None:
            release()

    def connect(self):
        deadline, why = self._hooks.deadline_source()
        if deadline - time.monotonic() <= 0:
            raise DownloadDeadlineError(f"timed out: {why}")
        if self._hooks.gate is not None and self._release_slot is None:
            # May wait for the host's slot (never past the deadline): the timeout below is what is left after.
            self._release_slot = self._hooks.gate(f"{self.host.lower()}:{self.port}", deadline, why)
        try:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DownloadDeadlineError(f"timed out: {why}")
            if not isinstance(self.timeout, (int, float)) or self.timeout > left:
                self.timeout = left
            self.response_class = functools.partial(_LimitedHTTPResponse,
                                                    max_bytes=self._hooks.policy.max_response_bytes,
                                                    deadline=deadline, why=why)
            super().connect()
        except BaseException:
            self._give_back_slot()
            raise

    def getresponse(self):
        # http.client closes the connection inside getresponse() when the response ends it ("passes the
        # connection to the response"): the slot must survive that and pass to the response too.
        self._handing_over = True
        try:
            response = super().getresponse()
        except BaseException:
            self._handing_over = False
            self._give_back_slot()
            raise
        self._handing_over = False
        if isinstance(response, _LimitedHTTPResponse) and not response.isclosed():
            response._release_slot, self._release_slot = self._release_slot, None  # the response holds it now
        else:
            self._give_back_slot()
        return response

    def close(self):
        try:
            super().close()
        finally:
            if not getattr(self, "_handing_over", False):
                self._give_back_slot()


class _GuardedHTTPConnection(_DeadlineConnectionMixin, http.client.HTTPConnection):
    def __init__(self, *args, hooks: _ConnectionHooks, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_guard(hooks)


class _GuardedHTTPSConnection(_DeadlineConnectionMixin, http.client.HTTPSConnection):
    def __init__(self, *args, hooks: _ConnectionHooks, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_guard(hooks)


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, hooks: _ConnectionHooks):
        super().__init__()
        self._connection = functools.partial(_GuardedHTTPConnection, hooks=hooks)

    def http_open(self, req):
        return self.do_open(self._connection, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, hooks: _ConnectionHooks):
        super().__init__()
        self._connection = functools.partial(_GuardedHTTPSConnection, hooks=hooks)

    def https_open(self, req):
        kwargs = {"context": self._context}
        if self._check_hostname is not None:
            kwargs["check_hostname"] = self._check_hostname
        return self.do_open(self._connection, req, **kwargs)
