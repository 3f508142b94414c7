"""A polite, guarded HTTP fetcher for image URLs (urllib3, one pool per host and address).

Per URL: connect and read timeouts and a total deadline; retries with exponential backoff and jitter on
429, 5xx and timeouts, honouring Retry-After; redirects followed by hand (at most ``max_redirects``) so
that every hop passes the network guard and connects to the very address the guard checked; the body
streamed with a byte cap that also bounds decompressed content; ``X-Robots-Tag: noai``/``noimageai``
honoured. The content itself is validated later, by decoding it (Content-Type is never trusted).

Nothing a URL or a server sends makes ``fetch`` raise: a URL that does not parse (a port out of range, a
broken IPv6 literal, a host with no IDNA form) is ``bad_url``, final; a redirect's Location gets the
same treatment; header values that make no sense (``Retry-After: soon``) are ignored. Host names go on
the wire IDNA-encoded and paths percent-encoded, whatever the URL held.
"""

from __future__ import annotations

import email.utils
import math
import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from urllib.parse import quote, urljoin, urlsplit

import certifi
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from pipeline.crawl.guard import BadHost, BlockedAddress, NetworkGuard, ResolveError, ascii_host
from pipeline.reasons import RETRYABLE, Reason, Status, http_reason

_REDIRECTS = {301, 302, 303, 307, 308}
_AI_OPTOUTS = ("noai", "noimageai")
# Printable ASCII goes on the request line as it is (a '%' already escaping something included); spaces,
# control characters and everything beyond ASCII are percent-encoded (as UTF-8), as browsers do.
_WIRE_SAFE = "".join(map(chr, range(0x21, 0x7F)))
_DETAIL_CHARS = 200


@dataclass(frozen=True)
class FetchParams:
    user_agent: str = "cropclean/0.1 (image dataset cleaning)"
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    deadline: float = 30.0
    retries: int = 2
    backoff: float = 0.5
    max_retry_after: float = 20.0
    max_redirects: int = 5
    max_bytes: int = 20 * 2**20
    per_host: int = 8
    per_host_delay: float = 0.0
    honor_robots: bool = True


@dataclass
class FetchOutcome:
    status: Status
    reason: str | None = None
    detail: str | None = None
    data: bytes | None = None
    final_url: str | None = None
    http_status: int | None = None
    retry_after: float | None = None
    tries: int = 0

    @property
    def retryable(self) -> bool:
        return self.status == Status.FAILED and self.reason in RETRYABLE


class _Deadline:
    """A URL's total time budget. Time spent queued behind this fetcher's own per-host cap and delay is
    added back: politeness towards a host must not turn a URL that host would serve into a timeout."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def extend(self, seconds: float) -> None:
        self.at += seconds

    def left(self) -> float:
        return self.at - time.monotonic()


class _Abort(Exception):
    def __init__(self, outcome: FetchOutcome) -> None:
        self.outcome = outcome


@dataclass
class _HostGate:
    """Caps concurrent requests to one host and spaces them by a delay."""

    slots: threading.Semaphore
    delay: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_start: float = 0.0

    def __enter__(self) -> None:
        self.slots.acquire()
        if self.delay:
            with self.lock:
                wait = self.next_start - time.monotonic()
                self.next_start = max(self.next_start, time.monotonic()) + self.delay
            if wait > 0:
                time.sleep(wait)

    def __exit__(self, *exc: object) -> None:
        self.slots.release()


def robots_optout(header_values: list[str]) -> bool:
    """True when an X-Robots-Tag value opts out of AI use (``noai``, ``noimageai``, also per user agent)."""
    for value in header_values:
        for directive in value.lower().replace(":", ",").split(","):
            if directive.strip() in _AI_OPTOUTS:
                return True
    return False


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After value (seconds or an HTTP date); None when it makes no sense."""
    if not value or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value.strip()).timestamp() - time.time()
        except (ValueError, TypeError, IndexError, OverflowError, OSError):
            return None
    return None if math.isnan(seconds) else max(0.0, seconds)


def detail_text(text: str) -> str:
    """``text`` fit for a row's detail: valid UTF-8 (stray surrogates escaped), printable, short."""
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _header_text(value: str) -> str:
    """A header value as text. http.client reads header bytes as Latin-1; servers that put non-ASCII in a
    Location send UTF-8, so read those bytes as UTF-8 where they are."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _bad_url(detail: str) -> FetchOutcome:
    return FetchOutcome(Status.FAILED, Reason.BAD_URL, detail_text(detail))


@dataclass(frozen=True)
class _Target:
    """Where one request goes: the parts of a URL in the form they are sent."""

    scheme: str
    host: str  # IP literal or IDNA-encoded name, lower case
    port: int
    path: str  # path and query, percent-encoded ASCII
    host_header: str


def _target(url: str) -> _Target:
    """The request for ``url``; _Abort with ``bad_url`` or ``unsupported_scheme`` when there is none."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            shown = f"{scheme}:" if scheme else "a URL without a scheme"
            raise _Abort(
                FetchOutcome(Status.REJECTED, Reason.UNSUPPORTED_SCHEME, detail_text(f"cannot fetch {shown}"))
            )
        explicit = parts.port  # ValueError for a port that is not a number in 0-65535
        if explicit == 0:
            raise _Abort(_bad_url("port 0"))
        host = ascii_host(parts.hostname or "")
        if parts.netloc.rpartition("@")[2].startswith("[") and ":" not in host:
            raise _Abort(_bad_url(f"[{host}] in brackets is not an IPv6 address"))
        # Bytes that were not UTF-8 (kept as surrogate escapes) are sent as they were; a lone surrogate
        # of any other kind has no bytes at all and raises UnicodeEncodeError: a bad URL too.
        path = quote(parts.path or "/", safe=_WIRE_SAFE, errors="surrogateescape")
        if parts.query:
            path += "?" + quote(parts.query, safe=_WIRE_SAFE, errors="surrogateescape")
    except BadHost as exc:
        raise _Abort(_bad_url(str(exc))) from None
    except ValueError as exc:  # urlsplit and .port (brackets, port, NFKC tricks), unencodable text
        raise _Abort(_bad_url(f"{type(exc).__name__}: {exc}")) from None
    port = explicit or (443 if scheme == "https" else 80)
    netloc_host = f"[{host}]" if ":" in host else host
    host_header = netloc_host if explicit is None else f"{netloc_host}:{explicit}"
    return _Target(scheme, host, port, path, host_header)


class Fetcher:
    """Thread-safe: one instance serves all the threads of a download task."""

    def __init__(self, params: FetchParams, guard: NetworkGuard, seed: int = 0) -> None:
        self.params = params
        self.guard = guard
        self._pools: dict[tuple[str, str, int, str], urllib3.HTTPConnectionPool] = {}
        self._gates: dict[str, _HostGate] = defaultdict(self._new_gate)
        self._lock = threading.Lock()
        self._rng = random.Random(seed)

    def _new_gate(self) -> _HostGate:
        return _HostGate(threading.Semaphore(self.params.per_host), self.params.per_host_delay)

    def _gate(self, host: str) -> _HostGate:
        with self._lock:
            return self._gates[host]

    def _pool(self, scheme: str, host: str, port: int, ip: str) -> urllib3.HTTPConnectionPool:
        key = (scheme, host, port, ip)
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                if scheme == "https":
                    pool = urllib3.HTTPSConnectionPool(
                        ip, port, maxsize=self.params.per_host, block=False, server_hostname=host,
                        assert_hostname=host, cert_reqs="CERT_REQUIRED", ca_certs=certifi.where(),
                    )  # fmt: skip
                else:
                    pool = urllib3.HTTPConnectionPool(ip, port, maxsize=self.params.per_host, block=False)
                self._pools[key] = pool
            return pool

    def close(self) -> None:
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()

    def fetch(self, url: str) -> FetchOutcome:
        """Fetch ``url``; never raises, whatever the URL, the network or the server does."""
        p = self.params
        deadline = _Deadline(p.deadline)
        outcome = FetchOutcome(Status.FAILED, Reason.TIMEOUT, "deadline passed before the first try")
        for attempt in range(p.retries + 1):
            try:
                outcome = self._follow(url, deadline)
            except Exception as exc:  # a defect here, not the URL's fault: still one outcome, never a halt
                outcome = FetchOutcome(
                    Status.FAILED, Reason.INTERNAL_ERROR, detail_text(f"{type(exc).__name__}: {exc}")
                )
            outcome.tries = attempt + 1
            if not outcome.retryable or attempt == p.retries:
                break
            wait = p.backoff * 2**attempt + self._rng.uniform(0, p.backoff)
            if outcome.retry_after is not None:  # the server said when: wait that long (within reason)
                wait = max(wait, min(outcome.retry_after, p.max_retry_after))
            if wait >= deadline.left():
                break
            time.sleep(wait)
        return outcome

    def _follow(self, url: str, deadline: _Deadline) -> FetchOutcome:
        current = url
        for hop in range(self.params.max_redirects + 1):
            try:
                response = self._request(current, deadline)
            except _Abort as abort:
                if hop and abort.outcome.reason in (Reason.BAD_URL, Reason.UNSUPPORTED_SCHEME):
                    abort.outcome.detail = detail_text(f"redirected: {abort.outcome.detail}")
                return abort.outcome
            if response.status in _REDIRECTS:
                location = response.headers.get("Location")
                response.close()  # its body is not wanted: drop the connection rather than read it
                response.release_conn()
                if not location or not location.strip():
                    return FetchOutcome(
                        Status.FAILED, http_reason(response.status), "redirect without Location"
                    )
                try:
                    current = urljoin(current, _header_text(location).strip())
                except ValueError as exc:  # the next hop is checked like the first: _target does the rest
                    return _bad_url(f"redirect to a malformed URL: {exc}")
                continue
            return self._read(response, current, deadline)
        return FetchOutcome(
            Status.FAILED, Reason.TOO_MANY_REDIRECTS, f"more than {self.params.max_redirects}"
        )

    def _request(self, url: str, deadline: _Deadline) -> urllib3.BaseHTTPResponse:
        p = self.params
        target = _target(url)
        host, port = target.host, target.port
        try:
            ip = str(self.guard.resolve(host, port)[0])
        except BlockedAddress as exc:
            raise _Abort(
                FetchOutcome(Status.REJECTED, Reason.BLOCKED_PRIVATE_ADDRESS, detail_text(str(exc)))
            ) from None
        except BadHost as exc:
            raise _Abort(_bad_url(str(exc))) from None
        except ResolveError as exc:
            raise _Abort(FetchOutcome(Status.FAILED, Reason.DNS_ERROR, detail_text(str(exc)))) from None
        headers = {
            "Host": target.host_header,
            "User-Agent": p.user_agent,
            "Accept": "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.9,*/*;q=0.5",
            "Accept-Encoding": "gzip, deflate",
        }
        gate, queued_at = self._gate(host), time.monotonic()
        try:
            with gate:
                deadline.extend(time.monotonic() - queued_at)
                left = deadline.left()
                if left <= 0:
                    raise _Abort(FetchOutcome(Status.FAILED, Reason.TIMEOUT, "total deadline passed"))
                connect, read = min(p.connect_timeout, left), min(p.read_timeout, left)
                timeout = urllib3.Timeout(connect=connect, read=read)
                return self._pool(target.scheme, host, port, ip).urlopen(
                    "GET", target.path, headers=headers, redirect=False, retries=False, timeout=timeout,
                    preload_content=False, decode_content=True, assert_same_host=False,
                )  # fmt: skip
        except NewConnectionError as exc:  # refused, unreachable; urllib3 derives it from ConnectTimeoutError
            raise _Abort(FetchOutcome(Status.FAILED, Reason.CONNECTION_ERROR, type(exc).__name__)) from None
        except (ConnectTimeoutError, ReadTimeoutError, TimeoutError) as exc:
            raise _Abort(FetchOutcome(Status.FAILED, Reason.TIMEOUT, type(exc).__name__)) from None
        except (ProtocolError, HTTPError, OSError) as exc:
            raise _Abort(FetchOutcome(Status.FAILED, Reason.CONNECTION_ERROR, type(exc).__name__)) from None

    def _read(self, response: urllib3.BaseHTTPResponse, url: str, deadline: _Deadline) -> FetchOutcome:
        p = self.params
        complete = False

        def end(
            status: Status, reason: str | None = None, detail: str | None = None, **kw: object
        ) -> FetchOutcome:
            return FetchOutcome(status, reason, detail, final_url=url, http_status=response.status, **kw)

        try:
            if response.status == 429:
                return end(Status.FAILED, Reason.HTTP_429, "rate limited",
                           retry_after=_retry_after(response.headers.get("Retry-After")))  # fmt: skip
            if response.status != 200:
                return end(Status.FAILED, http_reason(response.status), f"HTTP {response.status}")
            if p.honor_robots and robots_optout(response.headers.getlist("X-Robots-Tag")):
                return end(Status.REJECTED, Reason.ROBOTS_OPTOUT, "X-Robots-Tag opts out of AI use")
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > p.max_bytes:
                return end(Status.REJECTED, Reason.TOO_LARGE, f"Content-Length {length} > {p.max_bytes}")
            body = bytearray()
            while chunk := response.read1(64 * 1024):
                # read1 returns after one socket read, so a slow drip cannot outlive the deadline.
                body += chunk
                if len(body) > p.max_bytes:  # decompressed bytes: a gzip bomb stops here too
                    return end(Status.REJECTED, Reason.TOO_LARGE, f"body over {p.max_bytes} bytes")
                if deadline.left() < 0:
                    return end(Status.FAILED, Reason.TIMEOUT, "total deadline passed while reading")
            complete = True
            return end(Status.OK, data=bytes(body))
        except (ReadTimeoutError, TimeoutError):
            return end(Status.FAILED, Reason.TIMEOUT, "read timed out")
        except DecodeError as exc:
            return end(Status.REJECTED, Reason.NOT_AN_IMAGE, f"bad content encoding: {exc}")
        except (ProtocolError, HTTPError, OSError) as exc:
            return end(Status.FAILED, Reason.CONNECTION_ERROR, type(exc).__name__)
        finally:
            if not complete:  # an unread body must not go back to the pool with its connection
                response.close()
            response.release_conn()
