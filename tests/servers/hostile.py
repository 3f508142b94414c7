"""A loopback image host that misbehaves in every way the open web does.

``ImageServer`` serves valid images alongside slow, stalled, endless, mislabelled, redirecting,
compressed-bomb and opt-out responses. Every endless or slow route bounds itself in time and
bytes, and stops as soon as its client goes away, so a test run can never hang on it.

``/echo`` answers with whatever status and headers its query asks for (raw bytes, UTF-8 included), so
that a test can send any Location, Retry-After or Content-Length it can think of. A server can listen
on another loopback address (``ImageServer(host="127.0.0.2")``): one the network guard blocks.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import io
import select
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = (320, 240)
ANIM_SIZE = (200, 150)
BOMB_PNG_SIDE = 14000
GZIP_BOMB_INFLATED = 1 << 30
HUGE_DECLARED_LENGTH = 1 << 32
HUGE_CHUNKED_LIMIT = 8 << 30
HUGE_CHUNK = 64 * 1024
DEFAULT_MAX_SECONDS = 30.0
# Socket timeout per connection: bounds a blocked write to a client that stopped reading,
# and drops idle keep-alive connections.
SOCKET_TIMEOUT = 10.0
_POLL = 0.05


# --------------------------------------------------------------------------- images


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def make_image(name: str, size: tuple[int, int] = IMAGE_SIZE) -> Image.Image:
    """A deterministic RGB picture for ``name``; different names give perceptually different pictures.

    The coarse random colour grid dominates the low frequencies that perceptual hashes look at,
    so two names land far apart in pHash space.
    """
    rng = np.random.default_rng(_seed(name))
    grid = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(grid, "RGB").resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(5):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(15, w // 2)), y0 + int(rng.integers(15, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
    return img


@functools.lru_cache(maxsize=1024)
def image_bytes(name: str, fmt: str = "JPEG") -> bytes:
    """Encoded bytes of ``make_image(name)`` in ``fmt`` ("JPEG" or "PNG"); exactly what the server sends."""
    buf = io.BytesIO()
    img = make_image(name)
    if fmt.upper() == "JPEG":
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format=fmt.upper())
    return buf.getvalue()


@functools.cache
def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    make_image("cmyk").convert("CMYK").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@functools.cache
def animated_gif() -> bytes:
    frames = [
        make_image(f"anim-{i}", ANIM_SIZE).convert("P", palette=Image.Palette.ADAPTIVE) for i in range(3)
    ]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


@functools.cache
def bomb_png(side: int = BOMB_PNG_SIDE) -> bytes:
    """A valid 1-bit greyscale PNG of ``side`` x ``side`` pixels that is only kilobytes on the wire."""
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte "None" + packed bits
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    idat = zlib.compress(row * side, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


_bomb_lock = threading.Lock()


@functools.cache
def _gzip_bomb(inflated: int) -> bytes:
    block_size = 1 << 20
    if inflated % block_size:
        raise ValueError("inflated size must be a whole number of MiB")
    block = bytes(block_size)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    # A full flush resets the compressor, so every later 1 MiB block compresses to the same
    # bytes: compress two and repeat the second instead of deflating a whole GiB.
    first = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    repeat = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.flush(zlib.Z_FINISH)
    blocks = inflated // block_size
    crc = 0
    for _ in range(blocks):
        crc = zlib.crc32(block, crc)
    header = b"\x1f\x8b\x08\x00" + b"\x00\x00\x00\x00" + b"\x02\xff"
    trailer = struct.pack("<II", crc & 0xFFFFFFFF, inflated & 0xFFFFFFFF)
    return header + first + repeat * (blocks - 1) + tail + trailer


def gzip_bomb(inflated: int = GZIP_BOMB_INFLATED) -> bytes:
    """A single-member gzip stream (about 1 MB) that inflates to ``inflated`` zero bytes. Built once."""
    with _bomb_lock:
        return _gzip_bomb(inflated)


SVG_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="320" height="240" viewBox="0 0 320 240">'
    b'<rect width="320" height="240" fill="#3a7"/><circle cx="160" cy="120" r="80" fill="#fc3"/>'
    b"<script>alert(1)</script></svg>\n"
)


def html_page(title: str, body: str = "") -> bytes:
    return (
        f"<!DOCTYPE html><html><head><title>{title}</title></head>"
        f"<body><h1>{title}</h1>{body}</body></html>\n"
    ).encode()


# --------------------------------------------------------------------------- server plumbing


class _Httpd(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: LoopbackServer, host: str = "127.0.0.1") -> None:
        self.owner = owner
        self.active: set[socket.socket] = set()
        self.active_lock = threading.Lock()
        super().__init__((host, 0), RequestHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-response is the normal case here, not an error worth a traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT
    server: _Httpd

    route_path: str
    query: dict[str, list[str]]

    def setup(self) -> None:
        super().setup()
        with self.server.active_lock:
            self.server.active.add(self.connection)

    def finish(self) -> None:
        with self.server.active_lock:
            self.server.active.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, head: bool) -> None:
        parts = urlsplit(self.path)
        self.route_path = parts.path or "/"
        self.query = parse_qs(parts.query, keep_blank_values=True)
        try:
            self.server.owner._route(self, head)
        except OSError:
            self.close_connection = True

    # ----- helpers used by routes

    def header_dict(self) -> dict[str, str]:
        """Request headers with lower-cased names."""
        return {k.lower(): v for k, v in self.headers.items()}

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def send_body(
        self,
        status: int,
        body: bytes,
        content_type: str | None,
        head: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def send_redirect(self, location: str, head: bool, status: int = 302) -> None:
        self.send_body(status, html_page("Moved"), "text/html; charset=utf-8", head, {"Location": location})

    def write(self, data: bytes) -> bool:
        """Write to the client; False once it is gone."""
        try:
            self.wfile.write(data)
            return True
        except OSError:
            self.close_connection = True
            return False

    def peer_gone(self) -> bool:
        """True when the client has closed its end (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def hold(self, seconds: float, deadline: float) -> bool:
        """Wait up to ``seconds`` (never past ``deadline``); False if the client left or the server closes."""
        end = min(time.monotonic() + seconds, deadline)
        closing = self.server.owner._closing
        while True:
            if closing.is_set() or self.peer_gone():
                return False
            left = end - time.monotonic()
            if left <= 0:
                return time.monotonic() < deadline
            closing.wait(min(_POLL, left))


class LoopbackServer:
    """An HTTP server on a loopback address (127.0.0.1 unless ``host`` says another) with an ephemeral
    port, served from a daemon thread.

    Use as a context manager (or call ``start``/``stop``). Subclasses implement ``_route``.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._closing = threading.Event()
        self._httpd = _Httpd(self, host)
        self.host = host
        self.port: int = self._httpd.server_address[1]
        self.base_url = f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None
        self._streaming = 0
        self._streaming_lock = threading.Lock()

    def url(self, path: str) -> str:
        """Absolute URL for ``path`` on this server."""
        return self.base_url + (path if path.startswith("/") else "/" + path)

    @property
    def active_connections(self) -> int:
        """Client connections currently open (including idle keep-alive ones)."""
        with self._httpd.active_lock:
            return len(self._httpd.active)

    @property
    def streaming(self) -> int:
        """Slow or endless responses currently being sent."""
        with self._streaming_lock:
            return self._streaming

    def _stream_enter(self) -> None:
        with self._streaming_lock:
            self._streaming += 1

    def _stream_exit(self) -> None:
        with self._streaming_lock:
            self._streaming -= 1

    def start(self) -> Self:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"{type(self).__name__}:{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open connections and wait briefly for handlers to wind down."""
        self._closing.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        with self._httpd.active_lock:
            conns = list(self._httpd.active)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 2.0
        while self.active_connections and time.monotonic() < deadline:
            time.sleep(_POLL)
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _route(self, h: RequestHandler, head: bool) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- the hostile image host

_Route = Callable[[RequestHandler, bool], None]
_PrefixRoute = Callable[[RequestHandler, bool, str], None]


class ImageServer(LoopbackServer):
    """Loopback image host with good, bad and hostile routes (see the module docstring of each route).

    ``hits`` counts requests per path (query string dropped). ``request_times[key]`` holds the
    ``time.monotonic()`` of each ``/ratelimit/<key>`` request. ``reset()`` clears both and all
    per-key state. ``robots_txt``, when given, is served at ``/robots.txt`` (otherwise 404).
    ``max_seconds`` is the hard stop of every slow or endless route. The bodies that take time to build
    (the bombs) are built on ``start``, so that no request waits for them.
    """

    def __init__(
        self, robots_txt: str | None = None, max_seconds: float = DEFAULT_MAX_SECONDS, host: str = "127.0.0.1"
    ) -> None:
        super().__init__(host)
        self.robots_txt = robots_txt
        self.max_seconds = max_seconds
        self.hits: collections.Counter[str] = collections.Counter()
        self.request_times: dict[str, list[float]] = {}
        self._flaky: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._fixed: dict[str, _Route] = {
            "/cmyk.jpg": lambda h, head: h.send_body(200, cmyk_jpeg(), "image/jpeg", head),
            "/anim.gif": lambda h, head: h.send_body(200, animated_gif(), "image/gif", head),
            "/plain.jpg": lambda h, head: h.send_body(200, image_bytes("plain"), "text/plain", head),
            "/octet.jpg": lambda h, head: h.send_body(
                200, image_bytes("octet"), "application/octet-stream", head
            ),
            "/slow": self._slow,
            "/stall": self._stall,
            "/loop/a": lambda h, head: h.send_redirect("/loop/b", head),
            "/loop/b": lambda h, head: h.send_redirect("/loop/a", head),
            "/to-private": lambda h, head: h.send_redirect("http://10.0.0.1/img/x.jpg", head),
            "/to-metadata": lambda h, head: h.send_redirect("http://169.254.169.254/latest/meta-data/", head),
            "/to-loopback-other": lambda h, head: h.send_redirect(
                f"http://127.0.0.2:{self.port}/img/other.jpg", head
            ),
            "/to-localhost-name": lambda h, head: h.send_redirect(
                f"http://localhost:{self.port}/img/x.jpg", head
            ),
            "/huge": self._huge,
            "/huge-chunked": self._huge_chunked,
            "/gzip-bomb": lambda h, head: h.send_body(
                200, gzip_bomb(), "image/jpeg", head, {"Content-Encoding": "gzip"}
            ),
            "/html-as-jpeg": lambda h, head: h.send_body(
                200, html_page("Error 500", "<p>Something went wrong.</p>"), "image/jpeg", head
            ),
            "/truncated.jpg": self._truncated,
            "/image.svg": lambda h, head: h.send_body(200, SVG_BODY, "image/svg+xml", head),
            "/bomb.png": lambda h, head: h.send_body(200, bomb_png(), "image/png", head),
            "/noai.jpg": lambda h, head: h.send_body(
                200, image_bytes("noai"), "image/jpeg", head, {"X-Robots-Tag": "noai"}
            ),
            "/noimageai.jpg": lambda h, head: h.send_body(
                200, image_bytes("noimageai"), "image/jpeg", head, {"X-Robots-Tag": "noimageai, nosnippet"}
            ),
            "/noimageai-googlebot.jpg": lambda h, head: h.send_body(
                200,
                image_bytes("noimageai-googlebot"),
                "image/jpeg",
                head,
                {"X-Robots-Tag": "googlebot: noimageai"},
            ),
            "/robots-other.jpg": lambda h, head: h.send_body(
                200, image_bytes("robots-other"), "image/jpeg", head, {"X-Robots-Tag": "noindex"}
            ),
            "/empty.jpg": lambda h, head: h.send_body(200, b"", "image/jpeg", head),
            "/ua": lambda h, head: h.send_body(
                200, (h.headers.get("User-Agent") or "").encode(), "text/plain; charset=utf-8", head
            ),
            "/robots.txt": self._robots,
            "/host": lambda h, head: h.send_body(
                200, (h.headers.get("Host") or "").encode(), "text/plain; charset=utf-8", head
            ),
            "/echo": self._echo,
        }
        self._prefixed: list[tuple[str, _PrefixRoute]] = [
            ("/img/", self._img),
            ("/status/", self._status),
            ("/flaky/", self._flaky_route),
            ("/ratelimit/", self._ratelimit),
            ("/redirect/", self._redirect),
            ("/page/", self._page),
        ]

    def start(self) -> Self:
        for build in (gzip_bomb, bomb_png, cmyk_jpeg, animated_gif):  # cached: built once per process
            build()
        return super().start()

    def reset(self) -> None:
        """Clear ``hits``, ``request_times`` and every per-key counter."""
        with self._lock:
            self.hits.clear()
            self.request_times.clear()
            self._flaky.clear()

    def image_url(self, name: str, ext: str = "jpg") -> str:
        """URL of the distinct image ``name`` (``ext`` "jpg" or "png")."""
        return self.url(f"/img/{name}.{ext}")

    # ----- dispatch

    def _route(self, h: RequestHandler, head: bool) -> None:
        path = h.route_path
        with self._lock:
            self.hits[path] += 1
        route = self._fixed.get(path)
        if route is not None:
            route(h, head)
            return
        for prefix, prefixed in self._prefixed:
            if path.startswith(prefix) and len(path) > len(prefix):
                prefixed(h, head, path[len(prefix) :])
                return
        self._not_found(h, head)

    @staticmethod
    def _not_found(h: RequestHandler, head: bool) -> None:
        h.send_body(404, html_page("404 Not Found"), "text/html; charset=utf-8", head)

    # ----- simple routes

    def _img(self, h: RequestHandler, head: bool, rest: str) -> None:
        stem, dot, ext = rest.rpartition(".")
        if not dot or not stem or "/" in rest or ext not in ("jpg", "jpeg", "png"):
            self._not_found(h, head)
            return
        if ext == "png":
            h.send_body(200, image_bytes(stem, "PNG"), "image/png", head)
        else:
            h.send_body(200, image_bytes(stem, "JPEG"), "image/jpeg", head)

    def _page(self, h: RequestHandler, head: bool, rest: str) -> None:
        stem = rest.rsplit(".", 1)[0]
        body = html_page(f"Page {stem}", f'<img src="/img/{stem}.jpg" alt="{stem}">')
        h.send_body(200, body, "text/html; charset=utf-8", head)

    def _robots(self, h: RequestHandler, head: bool) -> None:
        if self.robots_txt is None:
            self._not_found(h, head)
        else:
            h.send_body(200, self.robots_txt.encode(), "text/plain; charset=utf-8", head)

    def _status(self, h: RequestHandler, head: bool, rest: str) -> None:
        if not rest.isdigit() or not 200 <= int(rest) <= 599:
            self._not_found(h, head)
            return
        code = int(rest)
        if code in (204, 304):
            h.send_response(code)
            h.end_headers()
            return
        h.send_body(code, html_page(f"Status {code}"), "text/html; charset=utf-8", head)

    def _flaky_route(self, h: RequestHandler, head: bool, key: str) -> None:
        raw = h.param("fail", "1") or "1"
        fail = int(raw) if raw.isdigit() else 1
        with self._lock:
            self._flaky[key] += 1
            seen = self._flaky[key]
        if seen <= fail:
            h.send_body(503, html_page("503 Service Unavailable"), "text/html; charset=utf-8", head)
        else:
            h.send_body(200, image_bytes(f"flaky-{key}"), "image/jpeg", head)

    def _ratelimit(self, h: RequestHandler, head: bool, key: str) -> None:
        with self._lock:
            times = self.request_times.setdefault(key, [])
            times.append(time.monotonic())
            first = len(times) == 1
        if first:
            h.send_body(
                429,
                html_page("429 Too Many Requests"),
                "text/html; charset=utf-8",
                head,
                {"Retry-After": "1"},
            )
        else:
            h.send_body(200, image_bytes(f"ratelimit-{key}"), "image/jpeg", head)

    def _redirect(self, h: RequestHandler, head: bool, rest: str) -> None:
        if not rest.isdigit() or int(rest) > 100:
            self._not_found(h, head)
            return
        n = int(rest)
        if n == 0:
            h.send_body(200, image_bytes("redirect-target"), "image/jpeg", head)
        else:
            h.send_redirect(f"/redirect/{n - 1}", head)

    def _echo(self, h: RequestHandler, head: bool) -> None:
        """``/echo?status=302&h=Location: /img/a.jpg&h=Retry-After: soon&body=image&name=a``: the status line,
        each ``h`` header as raw UTF-8 bytes (CR, LF and NUL dropped, nothing else checked), then a body:
        ``image`` (JPEG of ``name``, the default), ``html``, ``garbage`` or ``empty``. A Content-Length is
        added unless one is given (a wrong one included); the connection closes after every answer."""
        status = h.param("status", "200") or ""
        status = status if len(status) == 3 and status.isascii() and status.isdigit() else "400"
        kind = h.param("body", "image") or "image"
        bodies = {"html": html_page("Echo"), "garbage": b"\x00\xff garbage " * 40, "empty": b""}
        body = image_bytes(h.param("name", "echo") or "echo") if kind == "image" else bodies.get(kind, b"")
        lines = [f"HTTP/1.1 {status} Echo".encode()]
        given = []
        for raw in h.query.get("h", []):
            name, _, value = raw.partition(":")
            clean = "".join(ch for ch in f"{name}:{value}" if ch not in "\r\n\x00")
            lines.append(clean.encode("utf-8", "surrogateescape"))
            given.append(name.strip().lower())
        if "content-length" not in given and "transfer-encoding" not in given:
            lines.append(f"Content-Length: {len(body)}".encode())
        lines.append(b"Connection: close")
        h.close_connection = True
        h.write(b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head or status.startswith("1") else body))

    def _truncated(self, h: RequestHandler, head: bool) -> None:
        full = image_bytes("truncated")
        h.send_body(200, full[: int(len(full) * 0.4)], "image/jpeg", head)

    # ----- slow and endless routes: each bounded by max_seconds and by the client leaving

    def _slow(self, h: RequestHandler, head: bool) -> None:
        body = image_bytes("slow")
        h.close_connection = True
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if head:
            return
        deadline = time.monotonic() + self.max_seconds
        self._stream_enter()
        try:
            if not h.write(body[:64]):
                return
            pos = 64
            while pos < len(body) and h.hold(2.0, deadline):
                if not h.write(body[pos : pos + 1]):
                    return
                pos += 1
        finally:
            self._stream_exit()

    def _stall(self, h: RequestHandler, head: bool) -> None:
        h.close_connection = True
        self._stream_enter()
        try:
            deadline = time.monotonic() + self.max_seconds
            h.hold(self.max_seconds, deadline)
        finally:
            self._stream_exit()

    def _huge(self, h: RequestHandler, head: bool) -> None:
        h.close_connection = True
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(HUGE_DECLARED_LENGTH))
        h.end_headers()
        if not head:
            self._stream_zeros(h, HUGE_DECLARED_LENGTH, chunked=False)

    def _huge_chunked(self, h: RequestHandler, head: bool) -> None:
        h.close_connection = True
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        if not head:
            self._stream_zeros(h, HUGE_CHUNKED_LIMIT, chunked=True)

    def _stream_zeros(self, h: RequestHandler, limit: int, chunked: bool) -> None:
        """A real JPEG's first bytes, then zeros until the client leaves, ``limit`` or the time bound."""
        deadline = time.monotonic() + self.max_seconds
        closing = self._closing
        zeros = bytes(HUGE_CHUNK)
        prefix = image_bytes("huge")[:600]

        def frame(data: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(data), data) if chunked else data

        self._stream_enter()
        try:
            if not h.write(frame(prefix)):
                return
            sent = len(prefix)
            while sent < limit:
                if closing.is_set() or time.monotonic() >= deadline:
                    return  # stop short: the client sees a truncated body
                piece = zeros if limit - sent >= HUGE_CHUNK else zeros[: limit - sent]
                if not h.write(frame(piece)):
                    return
                sent += len(piece)
            if chunked:
                h.write(b"0\r\n\r\n")
        finally:
            self._stream_exit()
