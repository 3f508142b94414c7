"""Fuzzing the fetch and validate path (``Fetcher.fetch`` through the normalize stage's ``process_candidate``,
without Ray) against the hostile loopback server.

A seeded generator builds URLs from parts (schemes, userinfo, hosts, ports, IPv6 forms, IDN, paths with
percent-encoding, raw UTF-8 and undecodable bytes, queries, fragments) and, for ``/echo``, the answer the
server gives (status, Retry-After, Content-Length, Content-Type, Location, X-Robots-Tag, Content-Encoding,
Transfer-Encoding, body); a few parts are then mangled character by character. Every case must give
exactly one row that the images manifest accepts, with a valid status and, when not ok, a reason from
``pipeline.reasons``; no exception may escape (the catch-all's ``internal_error`` counts as one). Where a
URL's parts decide the outcome (a bad port, a blocked host, a scheme), the row must say so. Nothing may
reach the server listening on 127.0.0.2, and the resolver is asked only ASCII names.

A seeded generator rather than hypothesis (not a dependency here): the same cases every run, and the
very same generator runs at scale in ``bench/fuzz_fetch.py --cases 10000``.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import pyarrow as pa

from pipeline import manifests
from pipeline.crawl.fetch import Fetcher, FetchParams
from pipeline.crawl.guard import NetworkGuard, ResolveError
from pipeline.imaging import NormalizeParams
from pipeline.reasons import Reason, Status
from pipeline.sources import encode_locator
from pipeline.stages.normalize import process_candidate
from tests.servers.hostile import ImageServer

CASES = 400
SEED = 1729
THREADS = 8

# Short timeouts: nothing the generator asks for stalls, and a timeout is a valid outcome anyway.
FUZZ_FETCH = FetchParams(
    connect_timeout=1.0, read_timeout=1.0, deadline=2.0, retries=1, backoff=0.01, max_retry_after=0.05,
    max_redirects=3, max_bytes=1 << 20, per_host=8, user_agent="cropclean-fuzz/1",
)  # fmt: skip
FUZZ_NORMALIZE = NormalizeParams(min_side=16)

# The test's DNS: names map to loopback (served), private or blocked-loopback addresses; any other name
# does not resolve. Keys are the ASCII (IDNA) forms only: a Unicode name reaching it is a failure.
HOSTS = {
    "images.example": ["127.0.0.1"],
    "xn--bcher-kva.example": ["127.0.0.1"],  # bücher.example
    "xn--r8jz45g.xn--zckzah": ["127.0.0.1"],  # 例え.テスト
    "xn--zca.example": ["127.0.0.1"],  # ß.example under UTS #46
    "private.example": ["10.0.0.7"],
    "rebind.example": ["127.0.0.1", "10.0.0.8"],  # one bad address is enough
    "blocked-loopback.example": ["127.0.0.2"],
    "localhost": ["127.0.0.1", "::1"],
}
VALID_STATUSES = {s.value for s in Status}
VALID_REASONS = {r.value for r in Reason}
HTTP_REASON = re.compile(r"http_[1-4]\d\d")


@dataclass(frozen=True)
class Case:
    url: str
    expect: str | None = None  # the reason the URL's parts decide, when they do (None: ok or any)


@dataclass
class Rig:
    """The servers, the fetcher and an output folder one fuzz run works with."""

    server: ImageServer
    blocked: ImageServer  # listens on 127.0.0.2, which the guard must keep every request from
    closed_port: int  # nothing listens there: connection refused
    fetcher: Fetcher
    out: str
    asked: set[str] = field(default_factory=set)  # every name the resolver was asked


@contextlib.contextmanager
def rig() -> Iterator[Rig]:
    with (
        ImageServer() as server,
        ImageServer(host="127.0.0.2") as blocked,
        tempfile.TemporaryDirectory(prefix="fuzz-fetch-") as out,
    ):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        asked: set[str] = set()
        lock = threading.Lock()

        def resolve(host: str, port: int) -> list[str]:
            with lock:
                asked.add(host)
            if host.rstrip(".") in HOSTS:  # a trailing dot names the same host
                return HOSTS[host.rstrip(".")]
            raise ResolveError(f"cannot resolve {host}: not a test host")

        guard = NetworkGuard(NetworkGuard.from_cidrs(["127.0.0.1/32"]).allow, resolver=resolve)
        fetcher = Fetcher(FUZZ_FETCH, guard, seed=SEED)
        try:
            yield Rig(server, blocked, closed_port, fetcher, out, asked)
        finally:
            fetcher.close()


# --------------------------------------------------------------------------- the generator

SCHEMES = [("http", 60), ("https", 4), ("HTTP", 4), ("hTtPs", 2), ("ftp", 2), ("file", 2), ("javascript", 1),
           ("data", 1), ("gopher", 1), ("", 2), ("http:", 1)]  # fmt: skip
USERINFO = ["", "", "", "", "", "user@", "user:pa%40ss@", "@", ":@", "üser:päss@", "u%00@"]
FRAGMENTS = ["", "", "", "#frag", "#", "#ü?x=1", "#%zz@evil.example:1/"]


def _pick(rng: random.Random, weighted: list[tuple[str, int]]) -> str:
    return rng.choices([v for v, _ in weighted], [w for _, w in weighted])[0]


def _host(rng: random.Random, rig: Rig) -> tuple[str, str | None, bool]:
    """(netloc host, the reason it decides or None, whether it reaches the served loopback)."""
    blocked = Reason.BLOCKED_PRIVATE_ADDRESS.value
    bad = Reason.BAD_URL.value
    hosts = [
        ("127.0.0.1", None, True, 100),
        ("images.example", None, True, 6),
        ("IMAGES.Example.", None, True, 2),
        ("bücher.example", None, True, 4),
        ("BÜCHER.EXAMPLE", None, True, 1),
        ("例え.テスト", None, True, 2),
        ("ß.example", None, True, 1),
        ("[::ffff:127.0.0.1]", None, False, 1),  # allowed once unmapped; IPv6 may be off: no expectation
        ("127.0.0.2", blocked, False, 4),
        ("blocked-loopback.example", blocked, False, 2),
        ("10.0.0.1", blocked, False, 2),
        ("169.254.169.254", blocked, False, 2),
        ("[::1]", blocked, False, 2),
        ("[fe80::1%25lo]", blocked, False, 1),
        ("[fd00:ec2::254]", blocked, False, 1),
        ("0.0.0.0", blocked, False, 1),
        ("localhost", blocked, False, 2),
        ("private.example", blocked, False, 2),
        ("rebind.example", blocked, False, 2),
        ("2130706433", None, False, 1),  # 127.0.0.1 as one number: the system's inet_aton, not a test host
        ("unknown.example", Reason.DNS_ERROR.value, False, 3),
        ("xn--nxasmq6b.example", Reason.DNS_ERROR.value, False, 1),
        ("exa mple.com", bad, False, 2),
        ("a..b", bad, False, 2),
        ("exa\u200dmple.com", bad, False, 2),  # no IDNA form
        ("x%41.example", bad, False, 1),
        ("a" * 64 + ".example", bad, False, 1),
        ("[v1.x]", bad, False, 1),
        ("[127.0.0.1]", bad, False, 1),
        ("[::1", bad, False, 2),
        ("::1", bad, False, 1),
        ("", bad, False, 2),
        ("h\uff0fx", bad, False, 1),  # NFKC: a different host
        ("under_score.example", Reason.DNS_ERROR.value, False, 1),
    ]
    host, expect, served, _ = rng.choices(hosts, [h[3] for h in hosts])[0]
    return host, expect, served


def _port(rng: random.Random, rig: Rig) -> tuple[str, str | None]:
    """(":port" or "", the reason it decides)."""
    bad = Reason.BAD_URL.value
    ports = [
        (f":{rig.server.port}", None, 150),
        (f":{rig.closed_port}", None, 4),
        ("", None, 3),
        (":", None, 1),  # empty port: the default
        (":0", bad, 2),
        (":65536", bad, 2),
        (":99999", bad, 2),
        (":abc", bad, 2),
        (":-1", bad, 1),
        (":+80", bad, 1),
        (": 80", bad, 1),
        (":٣", bad, 1),  # an Arabic-Indic digit
        (f":{rig.server.port}:{rig.server.port}", bad, 1),
    ]
    port, expect, _ = rng.choices(ports, [p[2] for p in ports])[0]
    return port, expect


def _header_value(rng: random.Random, rig: Rig, name: str, depth: int) -> str:
    port = rig.server.port
    values = {
        "Retry-After": ["1", "0", "-5", "garbage", "", "1e400", "nan", "inf", "0.01", "  2 ", "٣",
                        "Wed, 21 Oct 2015 07:28:00 GMT", "Thu, 01 Jan 2099 00:00:00 GMT",
                        "Mon, 99 Foo 99999 99:99:99 GMT", "Fri, 31 Dec 9999 23:59:59 GMT"],
        "Content-Length": ["0", "5", "-1", "abc", "99999999999", "5, 5", "5, 6", "", "1e3", "٣", " 12 "],
        "Content-Type": ["image/jpeg", "text/html", "", "image/svg+xml", "application/octet-stream",
                         "image/jpeg; charset=\x7f", "ü/ü"],
        "X-Robots-Tag": ["noai", "noimageai", "googlebot: noimageai", "none", "", "nOaI,,,", ":::",
                         "noindex"],
        "Content-Encoding": ["gzip", "deflate", "br", "identity", "x-unknown", "gzip, gzip"],
        "Transfer-Encoding": ["chunked", "gzip", "identity"],
        "Location": [
            "/img/loc.jpg", f"http://127.0.0.1:{port}/img/abs.jpg", f"//127.0.0.1:{port}/img/proto.jpg",
            f"http://127.0.0.2:{rig.blocked.port}/img/blocked.jpg", "http://10.0.0.1/x.jpg",
            "http://169.254.169.254/latest/meta-data/", f"http://localhost:{port}/img/x.jpg",
            "http://[::1", "http://h:99999/", "http://exa\u200dmple.com/x.jpg", "file:///etc/passwd",
            "javascript:alert(1)", "data:image/jpeg;base64,AAAA", "", " ", "http://", "http:///x", "//",
            "?q=1", "#frag", "/img/grüße.jpg", f"http://bücher.example:{port}/img/idn.jpg",
            f"simplecache::http://127.0.0.2:{rig.blocked.port}/img/chain.jpg", "/img/" + "x" * 3000 + ".jpg",
            "/loop/a", "/redirect/2", "/status/404", "/to-private",
        ],
    }  # fmt: skip
    if name == "Location" and depth < 2 and rng.random() < 0.2:  # a redirect to another echo answer
        return _echo_path(rng, rig, depth + 1)
    return rng.choice(values[name])


def _echo_path(rng: random.Random, rig: Rig, depth: int = 0) -> str:
    status = rng.choice(["200"] * 6 + ["204", "206", "301", "302", "303", "307", "308", "304", "400",
                                       "404", "410", "429", "429", "500", "503", "599", "999", "100",
                                       "101"])  # fmt: skip
    query = [("status", status), ("body", rng.choice(["image", "image", "html", "garbage", "empty"]))]
    query.append(("name", f"fuzz-{rng.randrange(50)}"))
    for name, chance in (("Location", 0.9 if status.startswith("3") else 0.1), ("Retry-After", 0.3),
                         ("Content-Length", 0.15), ("Content-Type", 0.3), ("X-Robots-Tag", 0.15),
                         ("Content-Encoding", 0.08), ("Transfer-Encoding", 0.04)):  # fmt: skip
        if rng.random() < chance:
            query.append(("h", f"{name}: {_header_value(rng, rig, name, depth)}"))
    return "/echo?" + urlencode(query)


def _path(rng: random.Random, rig: Rig) -> str:
    n = rng.randrange(1000)
    choices = [
        (lambda: _echo_path(rng, rig), 60),
        (lambda: f"/img/fuzz-{n}.jpg", 12),
        (lambda: f"/img/fuzz-{n}.png", 3),
        (lambda: f"/img/%66uzz-{n}.jpg", 2),  # percent-encoded, still the same image
        (lambda: "/img/äpfel und birnen.jpg", 2),
        (lambda: "/img/\udce9-latin1.jpg", 1),  # a byte that was not UTF-8 (surrogate escape)
        (lambda: "/img/%zz.jpg", 1),
        (lambda: "/%00", 1),
        (lambda: f"/img/q.jpg?x={quote('ü')}&y=ü z", 2),
        (lambda: rng.choice(["/status/404", "/status/500", "/status/503", "/status/410"]), 4),
        (lambda: rng.choice(["/html-as-jpeg", "/truncated.jpg", "/image.svg", "/empty.jpg", "/anim.gif"]), 4),
        (lambda: rng.choice(["/noai.jpg", "/noimageai-googlebot.jpg", "/robots-other.jpg"]), 2),
        (lambda: rng.choice(["/loop/a", "/redirect/2", "/redirect/6", "/to-private", "/to-metadata"]), 3),
        (lambda: rng.choice(["/to-loopback-other", "/to-localhost-name", "/ratelimit/fuzz"]), 2),
        (lambda: f"/flaky/fuzz-{n}?fail={rng.randrange(3)}", 2),
        (lambda: rng.choice(["", "/", "?", "/?#"]), 2),
    ]
    return rng.choices([c for c, _ in choices], [w for _, w in choices])[0]()


_ODD = ["%", "%2", "%zz", "[", "]", "@", ":", "#", "?", "\\", " ", "\t", "\x00", "\x7f", "ü", "\u2044",
        "\uff0e", "\udce9", "..", "//", "%2e%2e", "\u200d"]  # fmt: skip


def _mangle(rng: random.Random, text: str) -> str:
    """``text`` with one odd character inserted, replaced or deleted."""
    i = rng.randrange(len(text) + 1)
    op = rng.randrange(3)
    if op == 0 or not text:
        return text[:i] + rng.choice(_ODD) + text[i:]
    if op == 1:
        return text[:i] + rng.choice(_ODD) + text[i + 1 :]
    return text[:i] + text[i + 1 :]


def make_case(rng: random.Random, rig: Rig) -> Case:
    scheme = _pick(rng, SCHEMES)
    userinfo = rng.choice(USERINFO)
    host, host_expect, served_host = _host(rng, rig)
    port, port_expect = _port(rng, rig)
    path, fragment = _path(rng, rig), rng.choice(FRAGMENTS)
    mangled = rng.random() < 0.15
    if mangled:  # one part, one odd character: the parser's edges
        part = rng.randrange(4)
        if part == 0:
            host = _mangle(rng, host)
        elif part == 1:
            port = _mangle(rng, port)
        elif part == 2:
            userinfo = _mangle(rng, userinfo)
        else:
            path = _mangle(rng, path)
    separator = "://" if scheme != "http:" else "/"  # "http:/host" is an http URL without a host
    url = f"{scheme}{separator}{userinfo}{host}{port}{path}{fragment}"
    expect = None
    if not mangled and "%00" not in userinfo:
        if scheme.lower() not in ("http", "https", "http:"):  # not the fetcher's: normalize refuses it
            expect = Reason.UNSUPPORTED_URL.value
        elif scheme == "http:":
            expect = Reason.BAD_URL.value
        elif host.startswith("[") and not host.endswith("]"):
            expect = Reason.BAD_URL.value  # the URL does not even split
        elif port_expect:
            expect = port_expect
        elif host_expect:
            expect = host_expect
        elif scheme.lower() == "http" and served_host and port == f":{rig.closed_port}":
            expect = Reason.CONNECTION_ERROR.value
    return Case(url, expect)


def generate(seed: int, n: int, rig: Rig) -> list[Case]:
    rng = random.Random(seed)
    return [make_case(rng, rig) for _ in range(n)]


# --------------------------------------------------------------------------- running and checking


def candidate(i: int, case: Case) -> dict[str, Any]:
    shown = case.url.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return {"image_id": f"fuzz-{i:06d}", "source": "fuzz", "source_key": shown, "url": shown,
            "locator": encode_locator(case.url), "label": None, "split": None}  # fmt: skip


def run_cases(rig: Rig, cases: list[Case], threads: int = THREADS) -> list[dict[str, Any]]:
    """One images row per case, through process_candidate with the rig's fetcher, ``threads`` at a time
    (as the normalize stage runs them); written to the manifest's Arrow schema, so every row must fit."""

    def one(item: tuple[int, Case]) -> dict[str, Any]:
        i, case = item
        return process_candidate(
            candidate(i, case), FUZZ_NORMALIZE, FUZZ_FETCH.max_bytes, rig.out, rig.fetcher
        )

    with ThreadPoolExecutor(threads) as pool:
        rows = list(pool.map(one, enumerate(cases)))
    pa.Table.from_pylist(rows, schema=manifests.load_schema("images").arrow_schema())
    return rows


def problems(case: Case, row: dict[str, Any]) -> list[str]:
    """What is wrong with ``row`` as the outcome of ``case`` (nothing, one hopes)."""
    found = []
    status, reason, detail = row.get("status"), row.get("reason"), row.get("detail")
    if status not in VALID_STATUSES:
        found.append(f"status {status!r}")
    if status == Status.OK and (reason is not None or not row.get("sha256") or not row.get("path")):
        found.append(f"ok with reason {reason!r}")
    if status != Status.OK and not (reason in VALID_REASONS or HTTP_REASON.fullmatch(str(reason))):
        found.append(f"reason {reason!r} is not from pipeline.reasons")
    if reason == Reason.INTERNAL_ERROR:
        found.append(f"an exception escaped: {detail}")
    if case.expect and reason != case.expect:
        found.append(f"expected {case.expect}, got {status}/{reason} ({detail})")
    if detail is not None and (not isinstance(detail, str) or not detail.isprintable() or len(detail) > 500):
        found.append(f"detail {detail!r}")
    return found


def check_run(rig: Rig, cases: list[Case], rows: list[dict[str, Any]]) -> list[str]:
    """Every problem of a run: per row, plus what must hold for the run as a whole."""
    found = [] if len(rows) == len(cases) else [f"{len(rows)} rows for {len(cases)} cases"]
    ids = [r["image_id"] for r in rows]
    if len(set(ids)) != len(ids):
        found.append("an image id with two rows")
    for case, row in zip(cases, rows, strict=False):
        found += [f"{case.url!r}: {p}" for p in problems(case, row)]
    if sum(rig.blocked.hits.values()):
        found.append(f"the blocked server was reached: {dict(rig.blocked.hits)}")
    found += [f"the resolver was asked a non-ASCII name {h!r}" for h in rig.asked if not h.isascii()]
    return found


def test_fetch_and_validate_never_raise_and_give_one_valid_row_per_url():
    with rig() as r:
        cases = generate(SEED, CASES, r)
        assert sum(c.expect is not None for c in cases) > CASES // 4  # the oracle covers a good share
        rows = run_cases(r, cases)
        found = check_run(r, cases, rows)
        assert not found, "\n".join(found[:20])
        outcomes = {(row["status"], row["reason"]) for row in rows}
        # The generator reaches the interesting outcomes, not just one kind.
        for wanted in [("ok", None), ("failed", "bad_url"), ("rejected", "blocked_private_address"),
                       ("rejected", "unsupported_url"), ("failed", "http_429"), ("failed", "dns_error"),
                       ("failed", "connection_error"), ("rejected", "robots_optout")]:  # fmt: skip
            assert wanted in outcomes, wanted
        assert r.server.hits["/echo"] > 0 and sum(r.server.hits.values()) > CASES // 2
