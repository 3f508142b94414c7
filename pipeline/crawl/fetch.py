"""A polite, guarded HTTP fetcher for image URLs, non-blocking (aiohttp on one event loop per fetcher).

Per URL: connect and read timeouts and a total deadline; retries with exponential backoff and jitter on
429, 5xx and timeouts, honouring Retry-After; redirects followed by hand (at most ``max_redirects``) so
that every hop passes the network guard and connects to the very address the guard checked; the body
streamed with a byte cap that also bounds decompressed content; ``X-Robots-Tag: noai``/``noimageai``
honoured. The content itself is validated later, by decoding it (Content-Type is never trusted).

Nothing a URL or a server sends makes ``fetch`` raise: a URL that does not parse (a port out of range, a
broken IPv6 literal, a host with no IDNA form) is ``bad_url``, final; a redirect's Location gets the
same treatment; header values that make no sense (``Retry-After: soon``) are ignored. Host names go on
the wire IDNA-encoded and paths percent-encoded, whatever the URL held.

Every request of a fetcher runs on its own event loop, in a thread of its own: socket waits cost no
thread hand-offs, and connections are kept per host. ``fetch`` may be called from any thread;
``fetch_all`` keeps many URLs in flight while its caller works on the ones already there.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import math
import queue
import random
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, urljoin, urlsplit

import aiohttp
import certifi
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.http_exceptions import ContentEncodingError
from yarl import URL

from pipeline.crawl.guard import BadHost, BlockedAddress, NetworkGuard, ResolveError, ascii_host
from pipeline.reasons import RETRYABLE, Reason, Status, http_reason

_REDIRECTS = {301, 302, 303, 307, 308}
_AI_OPTOUTS = ("noai", "noimageai")
# Printable ASCII goes on the request line as it is (a '%' already escaping something included); spaces,
# control characters and everything beyond ASCII are percent-encoded (as UTF-8), as browsers do.
_WIRE_SAFE = "".join(map(chr, range(0x21, 0x7F)))
_DETAIL_CHARS = 200
# Header lines as long as http.client accepts (aiohttp's own default is 8190 bytes).
_MAX_HEADER_LINE = 65536
_T = TypeVar("_T")


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
    """Caps concurrent requests to one host and spaces them by a delay (used on the fetcher's loop only)."""

    slots: asyncio.Semaphore
    delay: float
    next_start: float = 0.0

    async def __aenter__(self) -> None:
        await self.slots.acquire()
        if self.delay:
            now = time.monotonic()
            wait = self.next_start - now
            self.next_start = max(self.next_start, now) + self.delay
            if wait > 0:
                await asyncio.sleep(wait)

    async def __aexit__(self, *exc: object) -> None:
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


class _CheckedAddresses(AbstractResolver):
    """aiohttp's resolver: the address the network guard checked for a host, never a new lookup. A name
    that resolves differently the second time (DNS rebinding) still connects where the guard said yes."""

    def __init__(self) -> None:
        self.checked: dict[tuple[str, int], str] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        ip = self.checked.get((host.lower(), port))
        if ip is None:  # every request records its host first: this is a defect, not a URL's fault
            raise OSError(f"{host}:{port} was not checked by the network guard")
        return [ResolveResult(hostname=host, host=ip, port=port,
                              family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                              proto=0, flags=socket.AI_NUMERICHOST)]  # fmt: skip

    async def close(self) -> None:
        pass


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """Certificates checked against certifi's roots; made once per process (loading them costs about
    20 ms), and only when an https URL comes."""
    return ssl.create_default_context(cafile=certifi.where())


def _is_ip_literal(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


class _Loop:
    """An event loop in a daemon thread, with the fetcher's HTTP session; stopped by ``close``."""

    def __init__(self, params: FetchParams, resolver: _CheckedAddresses) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cropclean-fetch", daemon=True)
        self.thread.start()

        async def open_session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(
                resolver=resolver, use_dns_cache=False, limit=0, limit_per_host=0
            )
            return aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=True,
                max_line_size=_MAX_HEADER_LINE, max_field_size=_MAX_HEADER_LINE,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )  # fmt: skip

        self.session = self.run(open_session())

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the loop and wait for its result (from any thread but the loop's)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        if threading.current_thread() is self.thread:  # dropped by the loop's own thread: cannot wait
            self.loop.create_task(self.session.close())
            self.loop.call_soon(self.loop.stop)
            return
        if self.thread.is_alive():
            try:
                self.run(self.session.close())
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class Fetcher:
    """Thread-safe: one instance serves every thread of a download task; its requests share one loop."""

    def __init__(self, params: FetchParams, guard: NetworkGuard, seed: int = 0) -> None:
        self.params = params
        self.guard = guard
        self._resolver = _CheckedAddresses()
        self._gates: dict[str, _HostGate] = {}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._running: _Loop | None = None
        self._session: aiohttp.ClientSession | None = None  # the running loop's; closed with it

    def _loop(self) -> _Loop:
        with self._lock:
            if self._running is None:
                self._running = _Loop(self.params, self._resolver)
                self._session = self._running.session
                weakref.finalize(self, self._running.close)
            return self._running

    def close(self) -> None:
        with self._lock:
            running, self._running = self._running, None
        if running is not None:
            running.close()

    def fetch(self, url: str) -> FetchOutcome:
        """Fetch ``url``; never raises, whatever the URL, the network or the server does."""
        return self._loop().run(self.fetch_async(url))

    def fetch_all(self, urls: Sequence[str], at_once: int) -> Iterator[tuple[int, FetchOutcome]]:
        """Fetch every URL, ``at_once`` at a time; yields (index in ``urls``, outcome) as each arrives.
        A download waiting to be taken counts towards ``at_once`` until the caller asks for the next
        one, so bodies never pile up faster than the caller uses them."""
        running = self._loop()
        arrived: queue.SimpleQueue[tuple[int, FetchOutcome]] = queue.SimpleQueue()

        async def one(i: int, url: str, slots: asyncio.Semaphore) -> None:
            await slots.acquire()
            try:
                outcome = await self.fetch_async(url)
            except Exception as exc:  # never expected; the caller waits for every URL's outcome
                outcome = FetchOutcome(
                    Status.FAILED, Reason.INTERNAL_ERROR, detail_text(f"{type(exc).__name__}: {exc}")
                )
            arrived.put((i, outcome))

        async def start() -> tuple[asyncio.Semaphore, list[asyncio.Task[None]]]:
            slots = asyncio.Semaphore(max(1, at_once))
            return slots, [asyncio.ensure_future(one(i, url, slots)) for i, url in enumerate(urls)]

        slots, tasks = running.run(start())
        try:
            for _ in range(len(urls)):
                yield arrived.get()
                running.loop.call_soon_threadsafe(slots.release)
        finally:  # the caller stopped early: nothing more starts (nothing to stop once the fetcher closed)
            with contextlib.suppress(RuntimeError):
                running.loop.call_soon_threadsafe(lambda: [task.cancel() for task in tasks])

    async def fetch_async(self, url: str) -> FetchOutcome:
        """``fetch`` on the fetcher's own loop."""
        p = self.params
        deadline = _Deadline(p.deadline)
        outcome = FetchOutcome(Status.FAILED, Reason.TIMEOUT, "deadline passed before the first try")
        for attempt in range(p.retries + 1):
            try:
                outcome = await self._follow(url, deadline)
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
            await asyncio.sleep(wait)
        return outcome

    async def _follow(self, url: str, deadline: _Deadline) -> FetchOutcome:
        current = url
        for hop in range(self.params.max_redirects + 1):
            try:
                response = await self._request(current, deadline)
            except _Abort as abort:
                if hop and abort.outcome.reason in (Reason.BAD_URL, Reason.UNSUPPORTED_SCHEME):
                    abort.outcome.detail = detail_text(f"redirected: {abort.outcome.detail}")
                return abort.outcome
            if response.status in _REDIRECTS:
                location = response.headers.get("Location")
                response.close()  # its body is not wanted: drop the connection rather than read it
                if not location or not location.strip():
                    return FetchOutcome(
                        Status.FAILED, http_reason(response.status), "redirect without Location"
                    )
                try:  # header bytes arrive decoded as UTF-8 (others kept as surrogate escapes)
                    current = urljoin(current, location.strip())
                except ValueError as exc:  # the next hop is checked like the first: _target does the rest
                    return _bad_url(f"redirect to a malformed URL: {exc}")
                continue
            return await self._read(response, current, deadline)
        return FetchOutcome(
            Status.FAILED, Reason.TOO_MANY_REDIRECTS, f"more than {self.params.max_redirects}"
        )

    async def _checked_address(self, host: str, port: int) -> str:
        """The guard's address for ``host`` (a lookup, when it is a name, off the loop's thread)."""
        try:
            if _is_ip_literal(host):  # nothing to look up
                found = self.guard.resolve(host, port)
            else:
                found = await asyncio.get_running_loop().run_in_executor(None, self.guard.resolve, host, port)
        except BlockedAddress as exc:
            raise _Abort(
                FetchOutcome(Status.REJECTED, Reason.BLOCKED_PRIVATE_ADDRESS, detail_text(str(exc)))
            ) from None
        except BadHost as exc:
            raise _Abort(_bad_url(str(exc))) from None
        except ResolveError as exc:
            raise _Abort(FetchOutcome(Status.FAILED, Reason.DNS_ERROR, detail_text(str(exc)))) from None
        return str(found[0])

    def _gate(self, host: str) -> _HostGate:
        gate = self._gates.get(host)
        if gate is None:
            gate = _HostGate(asyncio.Semaphore(self.params.per_host), self.params.per_host_delay)
            self._gates[host] = gate
        return gate

    async def _request(self, url: str, deadline: _Deadline) -> aiohttp.ClientResponse:
        p = self.params
        target = _target(url)
        host, port = target.host, target.port
        ip = await self._checked_address(host, port)
        self._resolver.checked[(host, port)] = ip
        headers = {
            "Host": target.host_header,
            "User-Agent": p.user_agent,
            "Accept": "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.9,*/*;q=0.5",
            "Accept-Encoding": "gzip, deflate",
        }
        netloc = f"[{host}]" if ":" in host else host
        gate, queued_at = self._gate(host), time.monotonic()
        try:
            async with gate:
                deadline.extend(time.monotonic() - queued_at)
                left = deadline.left()
                if left <= 0:
                    raise _Abort(FetchOutcome(Status.FAILED, Reason.TIMEOUT, "total deadline passed"))
                timeout = aiohttp.ClientTimeout(
                    total=None, sock_connect=min(p.connect_timeout, left), sock_read=min(p.read_timeout, left)
                )
                assert self._session is not None  # requests run on the loop that opened it
                return await self._session.get(
                    URL(f"{target.scheme}://{netloc}:{port}{target.path}", encoded=True), headers=headers,
                    allow_redirects=False, timeout=timeout,
                    ssl=_tls_context() if target.scheme == "https" else True,
                )  # fmt: skip
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise _Abort(FetchOutcome(Status.FAILED, Reason.TIMEOUT, type(exc).__name__)) from None
        except aiohttp.InvalidURL as exc:
            raise _Abort(_bad_url(f"{type(exc).__name__}: {exc}")) from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # refused, unreachable, a broken answer
            raise _Abort(FetchOutcome(Status.FAILED, Reason.CONNECTION_ERROR, type(exc).__name__)) from None

    async def _read(self, response: aiohttp.ClientResponse, url: str, deadline: _Deadline) -> FetchOutcome:
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
            if p.honor_robots and robots_optout(response.headers.getall("X-Robots-Tag", [])):
                return end(Status.REJECTED, Reason.ROBOTS_OPTOUT, "X-Robots-Tag opts out of AI use")
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > p.max_bytes:
                return end(Status.REJECTED, Reason.TOO_LARGE, f"Content-Length {length} > {p.max_bytes}")
            body = bytearray()
            # Each read waits at most the read timeout (capped by the deadline when the request started).
            while chunk := await response.content.readany():
                body += chunk
                if len(body) > p.max_bytes:  # decompressed bytes: a gzip bomb stops here too
                    return end(Status.REJECTED, Reason.TOO_LARGE, f"body over {p.max_bytes} bytes")
                if deadline.left() < 0:
                    return end(Status.FAILED, Reason.TIMEOUT, "total deadline passed while reading")
            complete = True
            return end(Status.OK, data=bytes(body))
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return end(Status.FAILED, Reason.TIMEOUT, "read timed out")
        except aiohttp.ClientPayloadError as exc:
            if _bad_encoding(exc):
                return end(Status.REJECTED, Reason.NOT_AN_IMAGE, f"bad content encoding: {exc}")
            return end(Status.FAILED, Reason.CONNECTION_ERROR, type(exc).__name__)
        except (aiohttp.ClientError, OSError) as exc:
            return end(Status.FAILED, Reason.CONNECTION_ERROR, type(exc).__name__)
        finally:
            if complete:
                response.release()
            else:  # an unread body must not go back to the pool with its connection
                response.close()


def _bad_encoding(exc: BaseException) -> bool:
    """Whether a payload error comes from content the server compressed wrongly."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ContentEncodingError) or "content-encoding" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False
