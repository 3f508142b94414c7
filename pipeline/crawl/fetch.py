"""A polite, guarded HTTP fetcher for image URLs (urllib3, one pool per host and address).

Per URL: connect and read timeouts and a total deadline; retries with exponential backoff and jitter on
429, 5xx and timeouts, honouring Retry-After; redirects followed by hand (at most ``max_redirects``) so
that every hop passes the network guard and connects to the very address the guard checked; the body
streamed with a byte cap that also bounds decompressed content; ``X-Robots-Tag: noai``/``noimageai``
honoured. The content itself is validated later, by decoding it (Content-Type is never trusted).
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

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

from pipeline.crawl.guard import BlockedAddress, NetworkGuard, ResolveError
from pipeline.reasons import RETRYABLE, Reason, Status, http_reason

_REDIRECTS = {301, 302, 303, 307, 308}
_AI_OPTOUTS = ("noai", "noimageai")


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
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, when.timestamp() - time.time()) if when else None


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
        """Fetch ``url``; never raises for anything the network or the server does."""
        p = self.params
        deadline = _Deadline(p.deadline)
        outcome = FetchOutcome(Status.FAILED, Reason.TIMEOUT, "deadline passed before the first try")
        for attempt in range(p.retries + 1):
            outcome = self._follow(url, deadline)
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
        for _ in range(self.params.max_redirects + 1):
            try:
                response = self._request(current, deadline)
            except _Abort as abort:
                return abort.outcome
            if response.status in _REDIRECTS:
                location = response.headers.get("Location")
                response.close()  # its body is not wanted: drop the connection rather than read it
                response.release_conn()
                if not location:
                    return FetchOutcome(
                        Status.FAILED, http_reason(response.status), "redirect without Location"
                    )
                current = urljoin(current, location)
                continue
            return self._read(response, current, deadline)
        return FetchOutcome(
            Status.FAILED, Reason.TOO_MANY_REDIRECTS, f"more than {self.params.max_redirects}"
        )

    def _request(self, url: str, deadline: _Deadline) -> urllib3.BaseHTTPResponse:
        p = self.params
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _Abort(
                FetchOutcome(Status.REJECTED, Reason.UNSUPPORTED_SCHEME, f"cannot fetch {parts.scheme}:")
            )
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        try:
            ip = str(self.guard.resolve(host, port)[0])
        except BlockedAddress as exc:
            raise _Abort(FetchOutcome(Status.REJECTED, Reason.BLOCKED_PRIVATE_ADDRESS, str(exc))) from None
        except ResolveError as exc:
            raise _Abort(FetchOutcome(Status.FAILED, Reason.DNS_ERROR, str(exc))) from None
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        netloc_host = f"[{host}]" if ":" in host else host
        headers = {
            "Host": netloc_host if parts.port is None else f"{netloc_host}:{parts.port}",
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
                return self._pool(parts.scheme, host, port, ip).urlopen(
                    "GET", path, headers=headers, redirect=False, retries=False, timeout=timeout,
                    preload_content=False, decode_content=True, assert_same_host=False,
                )  # fmt: skip
        except (ConnectTimeoutError, ReadTimeoutError, TimeoutError) as exc:
            raise _Abort(FetchOutcome(Status.FAILED, Reason.TIMEOUT, type(exc).__name__)) from None
        except (NewConnectionError, ProtocolError, HTTPError, OSError) as exc:
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
