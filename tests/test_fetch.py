"""The guarded fetcher against a hostile image server on loopback: every route gets the right outcome."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from urllib.parse import urlencode

import pytest

from pipeline.crawl.fetch import Fetcher, FetchParams, robots_optout
from pipeline.crawl.guard import BadHost, BlockedAddress, NetworkGuard, ResolveError
from pipeline.imaging import Normalized, NormalizeParams, normalize_bytes
from pipeline.reasons import RETRYABLE, Reason, Status
from tests.servers.hostile import ImageServer
from tests.test_servers import wait_until

# Timeouts a loaded machine does not reach for a good image on loopback; /slow and /stall still end as
# timeouts (by the 5 s deadline), and no test here asserts how long anything took.
FAST = FetchParams(
    connect_timeout=3.0, read_timeout=3.0, deadline=5.0, retries=1, backoff=0.05, max_retry_after=3.0,
    max_redirects=4, max_bytes=2 * 2**20, user_agent="cropclean-test/1",
)  # fmt: skip


@pytest.fixture(scope="module")
def server():
    with ImageServer() as srv:
        yield srv


@pytest.fixture
def fetcher():
    f = Fetcher(FAST, NetworkGuard.from_cidrs(["127.0.0.1/32"]))
    yield f
    f.close()


def fetch(fetcher: Fetcher, server: ImageServer, path: str):
    return fetcher.fetch(server.url(path))


def echo(server: ImageServer, status: int = 200, *headers: str, body: str = "image") -> str:
    """URL of an answer with ``status`` and the raw ``headers`` ("Name: value")."""
    query = [("status", str(status)), ("body", body), *(("h", h) for h in headers)]
    return server.url("/echo?" + urlencode(query))


def decodes(data: bytes | None) -> bool:
    return data is not None and isinstance(normalize_bytes(data, NormalizeParams(min_side=16)), Normalized)


@pytest.mark.parametrize("path", ["/img/pho.jpg", "/img/pho.png", "/cmyk.jpg", "/anim.gif", "/plain.jpg",
                                  "/octet.jpg", "/redirect/3"])  # fmt: skip
def test_good_images_whatever_their_content_type(fetcher, server, path):
    got = fetch(fetcher, server, path)
    assert got.status == Status.OK, got
    assert decodes(got.data)


@pytest.mark.parametrize(
    ("path", "status", "reason"),
    [
        ("/status/404", Status.FAILED, "http_404"),
        ("/status/410", Status.FAILED, "http_410"),
        ("/status/403", Status.FAILED, "http_403"),
        ("/status/500", Status.FAILED, Reason.HTTP_5XX),
        ("/status/503", Status.FAILED, Reason.HTTP_5XX),
        ("/loop/a", Status.FAILED, Reason.TOO_MANY_REDIRECTS),
        ("/redirect/9", Status.FAILED, Reason.TOO_MANY_REDIRECTS),
        ("/to-private", Status.REJECTED, Reason.BLOCKED_PRIVATE_ADDRESS),
        ("/to-metadata", Status.REJECTED, Reason.BLOCKED_PRIVATE_ADDRESS),
        ("/to-loopback-other", Status.REJECTED, Reason.BLOCKED_PRIVATE_ADDRESS),
        ("/huge", Status.REJECTED, Reason.TOO_LARGE),
        ("/huge-chunked", Status.REJECTED, Reason.TOO_LARGE),
        ("/gzip-bomb", Status.REJECTED, Reason.TOO_LARGE),
        ("/noai.jpg", Status.REJECTED, Reason.ROBOTS_OPTOUT),
        ("/noimageai.jpg", Status.REJECTED, Reason.ROBOTS_OPTOUT),
        ("/slow", Status.FAILED, Reason.TIMEOUT),
        ("/stall", Status.FAILED, Reason.TIMEOUT),
    ],
)
def test_hostile_routes(fetcher, server, path, status, reason):
    # Endless routes end by the client's caps, not the server's own time bound: the outcome says which
    # (too_large, timeout; the server giving up would read as a truncated body). The deadline has a test
    # of its own below.
    got = fetch(fetcher, server, path)
    assert (got.status, got.reason) == (status, reason), got
    assert got.data is None


def test_the_deadline_cuts_a_slow_drip_and_leaves_no_time_for_retries(server):
    # /slow sends a byte every 2 s: each read returns well before the 10 s read timeout, so only the total
    # deadline (which also caps each socket wait) can end it. Once it has passed, no retry starts,
    # whatever `retries` allows.
    params = FetchParams(read_timeout=10.0, deadline=1.5, retries=3, backoff=0.01)
    f = Fetcher(params, NetworkGuard.from_cidrs(["127.0.0.1/32"]))
    server.reset()
    try:
        got = f.fetch(server.url("/slow"))
    finally:
        f.close()
    assert (got.status, got.reason, got.tries) == (Status.FAILED, Reason.TIMEOUT, 1), got
    assert server.hits["/slow"] == 1
    assert wait_until(lambda: server.streaming == 0)  # the connection was dropped, not left dripping


@pytest.mark.parametrize("path", ["/html-as-jpeg", "/truncated.jpg", "/image.svg", "/bomb.png", "/empty.jpg"])
def test_bodies_that_are_not_images_arrive_and_fail_decoding(fetcher, server, path):
    got = fetch(fetcher, server, path)
    assert got.status == Status.OK  # the transfer worked; decoding decides (never the Content-Type)
    assert not decodes(got.data)


def test_retry_after_is_honoured(fetcher, server):
    server.reset()
    got = fetch(fetcher, server, "/ratelimit/k1")
    assert got.status == Status.OK and got.tries == 2
    first, second = server.request_times["k1"][:2]
    assert second - first >= 0.9  # Retry-After: 1


def test_5xx_retried_with_backoff_then_success(fetcher, server):
    server.reset()
    got = fetch(fetcher, server, "/flaky/k2?fail=1")
    assert got.status == Status.OK and got.tries == 2 and server.hits["/flaky/k2"] == 2
    got = fetch(fetcher, server, "/flaky/k3?fail=5")  # more failures than retries: a retryable failure
    assert (got.status, got.reason, got.tries) == (Status.FAILED, Reason.HTTP_5XX, 2) and got.retryable


def test_time_queued_behind_the_per_host_cap_and_delay_does_not_count_against_the_deadline(server):
    # The waits are this fetcher's politeness towards the host, not the host's slowness: a URL the host
    # serves at once must not time out for having queued. One slot per host: /stall takes it and holds it
    # until its deadline cuts it off; the two image URLs queue behind it and behind the delay between
    # request starts (2.5 s, then 5 s), longer than their own 2 s deadline.
    deadline = 2.0
    params = FetchParams(read_timeout=deadline, deadline=deadline, retries=0, per_host=1, per_host_delay=2.5)
    fetcher = Fetcher(params, NetworkGuard.from_cidrs(["127.0.0.1/32"]))

    def timed(path: str):
        start = time.monotonic()
        got = fetch(fetcher, server, path)
        return got, time.monotonic() - start

    server.reset()
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            stalled = pool.submit(timed, "/stall")
            # The server has the /stall request: its fetch holds the one slot (no sleep decides the order).
            assert wait_until(lambda: server.hits["/stall"] == 1)
            queued = [pool.submit(timed, f"/img/queued-{i}.jpg") for i in range(2)]
            got, _ = stalled.result()
            assert (got.status, got.reason) == (Status.FAILED, Reason.TIMEOUT)
            for future in queued:
                got, _ = future.result()
                assert got.status == Status.OK and decodes(got.data), got
            # The premise: the last one spent longer than its whole deadline before it was served.
            assert queued[1].result()[1] > deadline
    finally:
        fetcher.close()


def test_robots_tag_can_be_ignored_and_other_directives_do_not_count(server):
    f = Fetcher(
        FetchParams(**{**FAST.__dict__, "honor_robots": False}), NetworkGuard.from_cidrs(["127.0.0.1/32"])
    )
    assert f.fetch(server.url("/noai.jpg")).status == Status.OK
    assert robots_optout(["noindex, nofollow"]) is False
    assert robots_optout(["googlebot: noimageai"]) and robots_optout(["NoAI"])
    g = Fetcher(FAST, NetworkGuard.from_cidrs(["127.0.0.1/32"]))
    assert g.fetch(server.url("/robots-other.jpg")).status == Status.OK


def test_user_agent_is_sent(fetcher, server):
    got = fetch(fetcher, server, "/ua")
    assert got.status == Status.OK and got.data == b"cropclean-test/1"


def test_guard_blocks_loopback_without_an_allowance(server):
    f = Fetcher(FAST, NetworkGuard())
    got = f.fetch(server.url("/img/guarded-only.jpg"))
    assert (got.status, got.reason) == (Status.REJECTED, Reason.BLOCKED_PRIVATE_ADDRESS)
    assert server.hits["/img/guarded-only.jpg"] == 0  # refused before connecting


def test_guard_classifies_addresses():
    guard = NetworkGuard.from_cidrs(["127.0.0.1/32"])
    for host in ("10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "127.0.0.2", "0.0.0.0", "::1",
                 "fe80::1", "fd00:ec2::254", "::ffff:10.0.0.1", "224.0.0.1", "100.64.0.1"):  # fmt: skip
        with pytest.raises(BlockedAddress):
            guard.resolve(host, 80)
    assert [str(a) for a in guard.resolve("127.0.0.1", 80)] == ["127.0.0.1"]
    assert [str(a) for a in guard.resolve("93.184.216.34", 80)] == ["93.184.216.34"]
    with pytest.raises(BlockedAddress):
        NetworkGuard().resolve("localhost", 80)  # names are resolved, then checked


def test_unsupported_scheme():
    f = Fetcher(FAST, NetworkGuard())
    assert f.fetch("ftp://example.org/x.jpg").reason == Reason.UNSUPPORTED_SCHEME
    assert f.fetch("file:///etc/passwd").reason == Reason.UNSUPPORTED_SCHEME


@pytest.mark.parametrize(
    "url",
    [
        "http://host:99999/x.jpg",  # port out of range
        "http://host:abc/",  # port not a number
        "http://127.0.0.1:-1/x.jpg",
        "http://127.0.0.1:0/x.jpg",
        "http://[::1/x",  # unbalanced bracket
        "http://[127.0.0.1]/x.jpg",  # IPv4 in brackets
        "http://[v1.x]/x.jpg",
        "http://exa mple.com/x.jpg",  # space in the host
        "http://a..b/x.jpg",  # empty label
        "http://exa\u200dmple.com/x.jpg",  # a joiner: no IDNA form
        "http://h\uff0fx/x.jpg",  # fullwidth solidus: a different host after NFKC
        "http:///x.jpg",  # no host
        "https://" + "a" * 64 + ".example/x.jpg",  # label too long
        "http://127.0.0.1/\ud800.jpg",  # a lone surrogate: no bytes to send
    ],
)
def test_malformed_urls_are_bad_url_final_and_never_raise(url):
    f = Fetcher(FAST, NetworkGuard.from_cidrs(["127.0.0.1/32"]))
    got = f.fetch(url)
    assert (got.status, got.reason, got.tries) == (Status.FAILED, Reason.BAD_URL, 1), got
    assert not got.retryable and Reason.BAD_URL not in RETRYABLE
    assert got.detail and got.detail.isprintable()
    got.detail.encode("utf-8")  # fit for a manifest


@pytest.mark.parametrize("value", ["garbage", "in a minute", "Mon, 99 Foo 99999 99:99:99 GMT"])
def test_a_429_with_a_senseless_retry_after_is_a_normal_http_429(fetcher, server, value):
    got = fetcher.fetch(echo(server, 429, f"Retry-After: {value}"))
    assert (got.status, got.reason, got.http_status) == (Status.FAILED, Reason.HTTP_429, 429), got
    assert got.retryable and got.tries == FAST.retries + 1


def test_international_host_names_are_idna_encoded_for_resolution_and_the_host_header(server):
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        if host in ("xn--bcher-kva.example", "xn--zca.example"):
            return ["127.0.0.1"]
        raise ResolveError(f"cannot resolve {host}")

    guard = dataclasses.replace(NetworkGuard.from_cidrs(["127.0.0.1/32"]), resolver=resolver)
    f = Fetcher(FAST, guard)
    got = f.fetch(f"http://BÜCHER.example:{server.port}/host")
    assert got.status == Status.OK and got.data == f"xn--bcher-kva.example:{server.port}".encode()
    got = f.fetch(f"http://ß.example:{server.port}/host")  # UTS #46, not the old IDNA 2003 "ss"
    assert got.status == Status.OK and got.data == f"xn--zca.example:{server.port}".encode()
    assert all(h.isascii() for h in asked)
    got = f.fetch(f"http://bücher.example:{server.port}/img/äpfel und birnen.jpg?q=ü#frag")
    assert got.status == Status.OK and decodes(got.data)  # path and query percent-encoded as UTF-8
    assert server.hits["/img/%C3%A4pfel%20und%20birnen.jpg"] >= 1


def test_redirect_locations_are_checked_like_urls(fetcher, server):
    blocked = Reason.BLOCKED_PRIVATE_ADDRESS
    with ImageServer(host="127.0.0.2") as other:  # loopback, but outside the allowed 127.0.0.1/32
        cases = {
            "Location: http://[::1": (Status.FAILED, Reason.BAD_URL),
            "Location: http://host:99999/x.jpg": (Status.FAILED, Reason.BAD_URL),
            "Location: http://exa\u200dmple.com/x.jpg": (Status.FAILED, Reason.BAD_URL),
            "Location: file:///etc/passwd": (Status.REJECTED, Reason.UNSUPPORTED_SCHEME),
            "Location: javascript:alert(1)": (Status.REJECTED, Reason.UNSUPPORTED_SCHEME),
            f"Location: http://127.0.0.2:{other.port}/img/x.jpg": (Status.REJECTED, blocked),
            "Location:    ": (Status.FAILED, "http_302"),
            "Location: /img/grüße.jpg": (Status.OK, None),  # raw UTF-8 bytes in the header
            f"Location: //127.0.0.1:{server.port}/img/relative-scheme.jpg": (Status.OK, None),
        }  # fmt: skip
        for header, expected in cases.items():
            got = fetcher.fetch(echo(server, 302, header))
            assert (got.status, got.reason) == expected, (header, got)
            assert got.detail is None or got.detail.isprintable()
        assert sum(other.hits.values()) == 0
    assert server.hits["/img/gr%C3%BC%C3%9Fe.jpg"] == 1


def test_guard_refuses_hosts_without_a_wire_form():
    guard = NetworkGuard()
    for host in ("exa mple.com", "a..b", "exa\u200dmple.com", "x%41.com", "a" * 64 + ".com", ""):
        with pytest.raises(BadHost):
            guard.resolve(host, 80)


def test_fetch_all_gives_each_url_its_own_outcome_once(fetcher, server):
    paths = [f"/img/all-{i}.jpg" for i in range(12)] + ["/status/404", "/to-private", "/huge"]
    urls = [server.url(p) for p in paths]
    got = dict(fetcher.fetch_all(urls, 4))
    assert sorted(got) == list(range(len(urls)))
    for i, path in enumerate(paths):
        alone = fetcher.fetch(urls[i])
        assert (got[i].status, got[i].reason, got[i].data) == (alone.status, alone.reason, alone.data), path
    assert all(got[i].status == Status.OK and decodes(got[i].data) for i in range(12))


def test_fetch_all_keeps_at_most_at_once_downloads_that_the_caller_has_not_taken(server):
    # Downloads that arrived but were not taken hold their slot: a caller that stops asking (busy with
    # the first image) stops the fetching too, so bodies never pile up in memory.
    f = Fetcher(FAST, NetworkGuard.from_cidrs(["127.0.0.1/32"]))
    server.reset()
    try:
        outcomes = f.fetch_all([server.url(f"/img/held-{i}.jpg") for i in range(10)], 3)
        first = next(outcomes)
        assert first[1].status == Status.OK
        assert wait_until(lambda: sum(server.hits.values()) >= 3)
        time.sleep(0.5)  # time for a fourth request, were one to start (a slow machine makes fewer, not more)
        assert sum(server.hits.values()) == 3
        rest = list(outcomes)
        assert sorted([first[0]] + [i for i, _ in rest]) == list(range(10))
        assert sum(server.hits.values()) == 10
        # The caller giving up midway cancels what has not started.
        server.reset()
        partial = f.fetch_all([server.url(f"/img/dropped-{i}.jpg") for i in range(10)], 2)
        next(partial)
        partial.close()
        time.sleep(0.5)
        assert sum(server.hits.values()) <= 2
    finally:
        f.close()


def test_a_name_is_looked_up_once_per_request_and_connected_to_where_the_guard_said_yes(server):
    # DNS rebinding: the name resolves to an allowed address when checked and to a private one after.
    # The connection goes to the checked address (no second lookup by the HTTP client), and the next
    # request's check sees the new answer and refuses it.
    answers = [["127.0.0.1"], ["10.0.0.9"]]
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return answers[min(len(asked), len(answers)) - 1]

    guard = dataclasses.replace(NetworkGuard.from_cidrs(["127.0.0.1/32"]), resolver=resolver)
    f = Fetcher(FAST, guard)
    try:
        got = f.fetch(f"http://flip.example:{server.port}/img/rebind.jpg")
        assert got.status == Status.OK and decodes(got.data), got
        assert asked == ["flip.example"]
        got = f.fetch(f"http://flip.example:{server.port}/img/rebind.jpg")
        assert (got.status, got.reason) == (Status.REJECTED, Reason.BLOCKED_PRIVATE_ADDRESS)
        assert asked == ["flip.example", "flip.example"]
    finally:
        f.close()


def _tls_files(folder, names: list[str]) -> tuple[str, str, str]:
    """A CA and a server certificate for ``names`` signed by it (PEM files in ``folder``)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("cropclean test CA", ca_key, "cropclean test CA", ca_key, ca=True)
    leaf = cert(names[0], leaf_key, "cropclean test CA", ca_key, ca=False)
    paths = [str(folder / n) for n in ("ca.pem", "leaf.pem", "leaf.key")]
    pem = serialization.Encoding.PEM
    for path, data in zip(paths, [ca.public_bytes(pem), leaf.public_bytes(pem), leaf_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())], strict=True):  # fmt: skip
        with open(path, "wb") as fh:
            fh.write(data)
    return paths[0], paths[1], paths[2]


def test_https_checks_the_certificate_against_the_name_while_connecting_to_the_checked_address(
    tmp_path, monkeypatch
):
    # The connection goes to the address the guard checked (here a name the test's resolver maps to
    # loopback), and TLS still verifies the server's certificate for the name in the URL (SNI included).
    import http.server
    import ssl
    import threading

    from pipeline.crawl import fetch as fetch_module
    from tests.servers.hostile import image_bytes

    ca, leaf, key = _tls_files(tmp_path, ["images.example"])
    body = image_bytes("tls")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(leaf, key)
    seen_names: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: seen_names.append(name)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]

    fetch_module._tls_context.cache_clear()
    monkeypatch.setattr(fetch_module, "_tls_context", lambda: ssl.create_default_context(cafile=ca))
    names = {"images.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]}
    guard = dataclasses.replace(
        NetworkGuard.from_cidrs(["127.0.0.1/32"]), resolver=lambda host, port: names[host]
    )
    f = Fetcher(FAST, guard)
    try:
        got = f.fetch(f"https://images.example:{port}/photo.jpg")
        assert got.status == Status.OK and got.data == body, got
        assert "images.example" in seen_names
        for wrong in (f"https://other.example:{port}/photo.jpg", f"https://127.0.0.1:{port}/photo.jpg"):
            got = f.fetch(wrong)  # the certificate names neither
            assert (got.status, got.reason) == (Status.FAILED, Reason.CONNECTION_ERROR), (wrong, got)
            assert got.data is None
    finally:
        f.close()
        httpd.shutdown()
