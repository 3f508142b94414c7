"""The loopback test servers behave as specified: routes, bounds, paging, auth and quota shapes."""

from __future__ import annotations

import http.client
import io
import itertools
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from urllib.parse import urlencode, urlsplit

import pytest
import requests
from PIL import Image

from tests.servers import (
    BraveImageSearchServer,
    GoogleCSEServer,
    ImageServer,
    SerpApiServer,
    image_bytes,
    page_url,
)
from tests.servers.hostile import DEFAULT_MAX_SECONDS, GZIP_BOMB_INFLATED, HUGE_CHUNKED_LIMIT

T = 3.0  # generous per-request timeout; nothing here should come near it
# How long a check waits for the server to notice something (a client gone): far more than it takes, even
# on a loaded machine, and far less than DEFAULT_MAX_SECONDS, after which a route would end by itself.
NOTICE = 10.0


def wait_until(pred: Callable[[], bool], timeout: float = NOTICE) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.fixture(scope="module")
def _server() -> Iterator[ImageServer]:
    with ImageServer(robots_txt="User-agent: *\nDisallow: /private/\n") as srv:
        yield srv


@pytest.fixture
def srv(_server: ImageServer) -> ImageServer:
    _server.reset()
    return _server


def raw_get(srv: ImageServer, path: str, method: str = "GET") -> tuple[http.client.HTTPResponse, bytes]:
    """One request on a fresh connection; the body is read undecoded."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=T)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


def assert_still_serves(srv: ImageServer) -> None:
    """No slow or endless response is still being sent, and a plain request is answered."""
    assert srv.streaming == 0
    r = requests.get(srv.url("/img/after.jpg"), timeout=T)
    assert r.status_code == 200 and r.content == image_bytes("after")


# --------------------------------------------------------------------------- ImageServer: basics


def test_binds_loopback_on_an_ephemeral_port(srv: ImageServer) -> None:
    assert srv.base_url == f"http://127.0.0.1:{srv.port}"
    assert srv.port != 0
    assert srv.url("/img/a.jpg") == f"http://127.0.0.1:{srv.port}/img/a.jpg"
    assert srv.url("img/a.jpg") == srv.url("/img/a.jpg")


def test_named_images_are_valid_and_distinct(srv: ImageServer) -> None:
    imagehash = pytest.importorskip("imagehash")
    hashes = []
    for name in ("alpha", "beta", "gamma", "delta"):
        r = requests.get(srv.url(f"/img/{name}.jpg"), timeout=T)
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "image/jpeg"
        assert r.content == image_bytes(name)
        img = Image.open(io.BytesIO(r.content))
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (320, 240))
        hashes.append(imagehash.phash(img))
    assert min(a - b for a, b in itertools.combinations(hashes, 2)) > 10
    r = requests.get(srv.url("/img/alpha.png"), timeout=T)
    assert r.headers["Content-Type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert (img.format, img.mode, img.size) == ("PNG", "RGB", (320, 240))
    assert requests.get(srv.url("/img/alpha.bmp"), timeout=T).status_code == 404


def test_odd_but_valid_images(srv: ImageServer) -> None:
    r = requests.get(srv.url("/cmyk.jpg"), timeout=T)
    assert Image.open(io.BytesIO(r.content)).mode == "CMYK"
    r = requests.get(srv.url("/anim.gif"), timeout=T)
    assert r.headers["Content-Type"] == "image/gif"
    gif = Image.open(io.BytesIO(r.content))
    assert (gif.size, gif.n_frames) == ((200, 150), 3)
    for path, ctype in (("/plain.jpg", "text/plain"), ("/octet.jpg", "application/octet-stream")):
        r = requests.get(srv.url(path), timeout=T)
        assert r.headers["Content-Type"] == ctype
        assert Image.open(io.BytesIO(r.content)).format == "JPEG"


def test_head_sends_headers_only(srv: ImageServer) -> None:
    resp, body = raw_get(srv, "/img/headed.jpg", method="HEAD")
    assert resp.status == 200
    assert body == b""
    assert int(resp.headers["Content-Length"]) == len(image_bytes("headed"))
    resp, body = raw_get(srv, "/huge", method="HEAD")
    assert (resp.status, resp.headers["Content-Length"], body) == (200, "4294967296", b"")


@pytest.mark.parametrize("code", [403, 404, 410, 429, 500, 502, 503])
def test_status_route(srv: ImageServer, code: int) -> None:
    r = requests.get(srv.url(f"/status/{code}"), timeout=T)
    assert r.status_code == code
    assert r.headers["Content-Type"].startswith("text/html")
    assert str(code) in r.text


def test_unknown_paths_are_404(srv: ImageServer) -> None:
    for path in ("/nope", "/img/", "/status/abc", "/redirect/x"):
        assert requests.get(srv.url(path), timeout=T).status_code == 404, path


def test_flaky_fails_n_times_per_key(srv: ImageServer) -> None:
    codes = [requests.get(srv.url("/flaky/k1?fail=2"), timeout=T).status_code for _ in range(3)]
    assert codes == [503, 503, 200]
    codes = [requests.get(srv.url("/flaky/k2"), timeout=T).status_code for _ in range(2)]
    assert codes == [503, 200]
    srv.reset()
    assert requests.get(srv.url("/flaky/k2"), timeout=T).status_code == 503


def test_ratelimit_asks_to_wait_then_serves(srv: ImageServer) -> None:
    r = requests.get(srv.url("/ratelimit/r1"), timeout=T)
    assert (r.status_code, r.headers["Retry-After"]) == (429, "1")
    r = requests.get(srv.url("/ratelimit/r1"), timeout=T)
    assert r.status_code == 200
    assert Image.open(io.BytesIO(r.content)).format == "JPEG"
    assert len(srv.request_times["r1"]) == 2
    assert srv.request_times["r1"][0] <= srv.request_times["r1"][1]
    assert requests.get(srv.url("/ratelimit/r2"), timeout=T).status_code == 429


def test_redirects(srv: ImageServer) -> None:
    r = requests.get(srv.url("/loop/a"), timeout=T, allow_redirects=False)
    assert (r.status_code, r.headers["Location"]) == (302, "/loop/b")
    r = requests.get(srv.url("/loop/b"), timeout=T, allow_redirects=False)
    assert r.headers["Location"] == "/loop/a"
    session = requests.Session()
    session.max_redirects = 5
    with pytest.raises(requests.TooManyRedirects):
        session.get(srv.url("/loop/a"), timeout=T)
    r = requests.get(srv.url("/redirect/3"), timeout=T)
    assert r.status_code == 200
    assert len(r.history) == 3
    assert r.content == image_bytes("redirect-target")


def test_redirects_towards_forbidden_hosts(srv: ImageServer) -> None:
    expected = {
        "/to-private": "http://10.0.0.1/img/x.jpg",
        "/to-metadata": "http://169.254.169.254/latest/meta-data/",
        "/to-loopback-other": f"http://127.0.0.2:{srv.port}/img/other.jpg",
        "/to-localhost-name": f"http://localhost:{srv.port}/img/x.jpg",
    }
    for path, location in expected.items():
        r = requests.get(srv.url(path), timeout=T, allow_redirects=False)
        assert (r.status_code, r.headers["Location"]) == (302, location)


def test_mislabelled_and_broken_bodies(srv: ImageServer) -> None:
    r = requests.get(srv.url("/html-as-jpeg"), timeout=T)
    assert r.headers["Content-Type"] == "image/jpeg"
    assert r.content.startswith(b"<!DOCTYPE html>")
    resp, body = raw_get(srv, "/truncated.jpg")
    full = image_bytes("truncated")
    assert int(resp.headers["Content-Length"]) == len(body) == int(len(full) * 0.4)
    assert full.startswith(body)
    with pytest.raises(OSError):
        Image.open(io.BytesIO(body)).load()
    r = requests.get(srv.url("/image.svg"), timeout=T)
    assert r.headers["Content-Type"] == "image/svg+xml"
    assert b"<svg" in r.content
    resp, body = raw_get(srv, "/empty.jpg")
    assert (resp.status, resp.headers["Content-Length"], body) == (200, "0", b"")


def test_robots_headers_and_user_agent(srv: ImageServer) -> None:
    tags = {
        "/noai.jpg": "noai",
        "/noimageai.jpg": "noimageai, nosnippet",
        "/noimageai-googlebot.jpg": "googlebot: noimageai",
        "/robots-other.jpg": "noindex",
    }
    for path, tag in tags.items():
        r = requests.get(srv.url(path), timeout=T)
        assert r.headers["X-Robots-Tag"] == tag
        assert Image.open(io.BytesIO(r.content)).format == "JPEG"
    assert "X-Robots-Tag" not in requests.get(srv.url("/img/a.jpg"), timeout=T).headers
    r = requests.get(srv.url("/ua"), headers={"User-Agent": "cropclean-test/1.0 (+https://x)"}, timeout=T)
    assert r.text == "cropclean-test/1.0 (+https://x)"
    r = requests.get(srv.url("/robots.txt"), timeout=T)
    assert "Disallow: /private/" in r.text
    with ImageServer() as bare:
        assert requests.get(bare.url("/robots.txt"), timeout=T).status_code == 404


def test_echo_sends_the_status_and_raw_headers_asked_for(srv: ImageServer) -> None:
    query = urlencode([("status", "302"), ("h", "Location: /img/grüße.jpg"), ("h", "Retry-After: soon"),
                       ("h", "X-Evil: a\r\nInjected: yes"), ("body", "html")])  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=T)
    sock.sendall(f"GET /echo?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    raw = b""
    while chunk := sock.recv(65536):  # the server closes after every echo
        raw += chunk
    sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 302 Echo"
    assert "Location: /img/grüße.jpg".encode() in lines  # UTF-8 bytes, as some servers send them
    assert b"Retry-After: soon" in lines and b"X-Evil: aInjected: yes" in lines  # no header injection
    assert f"Content-Length: {len(body)}".encode() in lines and body.startswith(b"<!DOCTYPE html>")
    resp, body = raw_get(srv, "/echo?" + urlencode([("h", "Content-Length: 3"), ("body", "image")]))
    assert (resp.status, body) == (200, image_bytes("echo")[:3])  # a wrong length is sent as given
    resp, _ = raw_get(srv, "/echo?status=abc")
    assert resp.status == 400


def test_listens_on_another_loopback_address() -> None:
    with ImageServer(host="127.0.0.2") as other:
        assert other.base_url == f"http://127.0.0.2:{other.port}"
        r = requests.get(other.url("/host"), timeout=T)
        assert r.text == f"127.0.0.2:{other.port}" and other.hits["/host"] == 1


def test_page_route_points_at_the_image(srv: ImageServer) -> None:
    page = page_url(srv.image_url("cat-7"))
    assert page == srv.url("/page/cat-7.html")
    r = requests.get(page, timeout=T)
    assert r.status_code == 200
    assert '<img src="/img/cat-7.jpg"' in r.text


def test_gzip_bomb_is_small_and_inflates_to_a_gibibyte(srv: ImageServer) -> None:
    resp, body = raw_get(srv, "/gzip-bomb")
    assert resp.headers["Content-Encoding"] == "gzip"
    assert resp.headers["Content-Type"] == "image/jpeg"
    assert 100_000 < len(body) < 10_000_000
    assert body[:2] == b"\x1f\x8b"
    assert struct.unpack("<I", body[-4:])[0] == GZIP_BOMB_INFLATED % (1 << 32)
    # Inflate only a bounded prefix; the whole stream was checked when the bomb was designed.
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    head = inflater.decompress(body[:200_000], 32 << 20)
    assert len(head) == 32 << 20
    assert head.count(0) == len(head)


def test_bomb_png_is_a_small_valid_decompression_bomb(srv: ImageServer) -> None:
    r = requests.get(srv.url("/bomb.png"), timeout=T)
    assert r.headers["Content-Type"] == "image/png"
    assert len(r.content) < 100_000
    assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth = struct.unpack(">IIB", r.content[16:25])
    assert (width, height, depth) == (14000, 14000, 1)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(r.content))


def test_hits_count_per_path_across_threads(srv: ImageServer) -> None:
    def fetch() -> None:
        with requests.Session() as s:
            for i in range(10):
                assert s.get(srv.url(f"/img/h.jpg?i={i}"), timeout=T).status_code == 200

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    requests.get(srv.url("/nope?x=1"), timeout=T)
    assert srv.hits["/img/h.jpg"] == 80
    assert srv.hits["/nope"] == 1
    srv.reset()
    assert not srv.hits


# --------------------------------------------------------------------- ImageServer: slow and endless routes


def test_stall_ends_when_the_client_gives_up(srv: ImageServer) -> None:
    with pytest.raises(requests.ReadTimeout):
        requests.get(srv.url("/stall"), timeout=(T, 0.3))
    assert wait_until(lambda: srv.streaming == 0)
    assert_still_serves(srv)


def test_slow_drips_and_stops_when_the_client_closes(srv: ImageServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=T)
    conn.request("GET", "/slow")
    resp = conn.getresponse()
    assert resp.status == 200
    assert int(resp.headers["Content-Length"]) == len(image_bytes("slow"))
    assert resp.read(64) == image_bytes("slow")[:64]
    conn.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        resp.read(200)
    assert srv.streaming == 1
    conn.close()
    assert wait_until(lambda: srv.streaming == 0)
    assert_still_serves(srv)


@pytest.mark.parametrize("path", ["/huge", "/huge-chunked"])
def test_huge_streams_until_the_client_closes(srv: ImageServer, path: str) -> None:
    with requests.get(srv.url(path), timeout=T, stream=True) as r:
        assert r.headers["Content-Type"] == "image/jpeg"
        if path == "/huge":
            assert r.headers["Content-Length"] == "4294967296"
        else:
            assert "Content-Length" not in r.headers
            assert r.headers["Transfer-Encoding"] == "chunked"
        got = b""
        for chunk in r.iter_content(64 * 1024):
            got += chunk
            if len(got) >= 1 << 20:
                break
        assert got[:2] == b"\xff\xd8"
        assert got[600:].count(0) == len(got) - 600
    assert wait_until(lambda: srv.streaming == 0)
    assert_still_serves(srv)


def test_endless_routes_bound_themselves_in_time() -> None:
    # No wall-clock bound to meet: the server has to end each response by itself, before the client's
    # socket timeout (NOTICE, 25 times max_seconds) and, for /huge-chunked, long before its byte limit.
    with ImageServer(max_seconds=0.4) as srv:
        # A client that never gives up still gets the connection closed.
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=NOTICE)
        sock.sendall(b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(16) == b""  # closed by the server, not a timeout here
        sock.close()
        # A client that reads forever still reaches the end, short of the route's byte limit.
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=NOTICE)
        sock.sendall(b"GET /huge-chunked HTTP/1.1\r\nHost: x\r\n\r\n")
        received, tail = 0, b""
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
            tail = (tail + chunk)[-16:]
        sock.close()
        assert 0 < received < HUGE_CHUNKED_LIMIT // 2
        assert not tail.endswith(b"0\r\n\r\n")  # cut off by time, not finished
        assert wait_until(lambda: srv.streaming == 0)


def test_stop_cuts_open_slow_connections() -> None:
    srv = ImageServer().start()
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=NOTICE)
    sock.sendall(b"GET /stall HTTP/1.1\r\nHost: x\r\n\r\n")
    assert wait_until(lambda: srv.streaming == 1)
    start = time.monotonic()
    srv.stop()
    # The stall would last DEFAULT_MAX_SECONDS on its own: stop cut it (a bound no load gets near).
    assert time.monotonic() - start < DEFAULT_MAX_SECONDS / 2
    assert sock.recv(16) == b""
    sock.close()
    assert srv.streaming == 0 and srv.active_connections == 0


# --------------------------------------------------------------------------- providers

QUERY = "red fox"


@pytest.fixture(scope="module")
def fox_urls(_server: ImageServer) -> list[str]:
    return [_server.image_url(f"fox-{i}") for i in range(250)]


def test_endpoints_are_full_urls(fox_urls: list[str]) -> None:
    with (
        BraveImageSearchServer({QUERY: fox_urls}, "bk") as brave,
        GoogleCSEServer({QUERY: fox_urls}, "gk") as google,
        SerpApiServer({QUERY: fox_urls}, "sk") as serp,
    ):
        assert brave.brave_endpoint == f"http://127.0.0.1:{brave.port}/res/v1/images/search"
        assert google.google_endpoint == f"http://127.0.0.1:{google.port}/customsearch/v1"
        assert serp.serpapi_endpoint == f"http://127.0.0.1:{serp.port}/search.json"
        assert brave.endpoint == brave.brave_endpoint


def test_brave_pages_by_count_and_offset(fox_urls: list[str]) -> None:
    with BraveImageSearchServer({QUERY: fox_urls}, ["bk", "bk2"]) as brave:
        hdr = {"X-Subscription-Token": "bk", "Accept": "application/json"}
        r = requests.get(
            brave.endpoint, params={"q": QUERY, "count": 20, "offset": 1}, headers=hdr, timeout=T
        )
        assert r.status_code == 200
        body = r.json()
        assert (body["type"], body["query"]["original"]) == ("images", QUERY)
        assert [x["properties"]["url"] for x in body["results"]] == fox_urls[20:40]
        first = body["results"][0]
        assert first["type"] == "image_result"
        assert first["url"] == page_url(fox_urls[20])
        assert first["source"] == urlsplit(fox_urls[20]).netloc
        assert set(first["thumbnail"]) >= {"src"}
        assert set(first["properties"]) >= {"url", "placeholder", "width", "height"}
        assert set(first["meta_url"]) == {"scheme", "netloc", "hostname", "favicon", "path"}
        r = requests.get(
            brave.endpoint, params={"q": QUERY}, headers={"X-Subscription-Token": "bk2"}, timeout=T
        )
        assert [x["properties"]["url"] for x in r.json()["results"]] == fox_urls[:50]
        r = requests.get(brave.endpoint, params={"q": QUERY, "count": 200}, headers=hdr, timeout=T)
        assert len(r.json()["results"]) == 200
        r = requests.get(brave.endpoint, params={"q": "nothing"}, headers=hdr, timeout=T)
        assert r.json()["results"] == []
        sent = brave.search_requests()
        assert [req.params.get("offset") for req in sent] == ["1", None, None, None]
        assert all(req.headers["x-subscription-token"] in ("bk", "bk2") for req in sent)
        assert all("key" not in req.params and "api_key" not in req.params for req in sent)
    with BraveImageSearchServer({QUERY: fox_urls}, "bk", honor_offset=False) as brave:
        r = requests.get(
            brave.endpoint,
            params={"q": QUERY, "count": 5, "offset": 3},
            headers={"X-Subscription-Token": "bk"},
            timeout=T,
        )
        assert [x["properties"]["url"] for x in r.json()["results"]] == fox_urls[:5]


def test_brave_auth_validation_and_quota_errors(fox_urls: list[str]) -> None:
    with BraveImageSearchServer({QUERY: fox_urls}, "bk", quota=2) as brave:
        r = requests.get(brave.endpoint, params={"q": QUERY}, timeout=T)
        assert r.status_code == 422
        err = r.json()
        assert err["type"] == "ErrorResponse"
        assert err["error"]["code"] == "VALIDATION"
        assert err["error"]["meta"]["errors"][0]["loc"] == ["header", "x-subscription-token"]
        r = requests.get(
            brave.endpoint, params={"q": QUERY}, headers={"X-Subscription-Token": "bad"}, timeout=T
        )
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "SUBSCRIPTION_TOKEN_INVALID"
        assert r.json()["error"]["meta"] == {"component": "authentication"}
        hdr = {"X-Subscription-Token": "bk"}
        for params in ({"q": QUERY, "count": 201}, {"q": QUERY, "count": 0}, {"q": QUERY, "offset": 10}, {}):
            r = requests.get(brave.endpoint, params=params, headers=hdr, timeout=T)
            assert (r.status_code, r.json()["error"]["code"]) == (422, "VALIDATION"), params
        assert brave.successful_calls == 0
        for _ in range(2):
            r = requests.get(brave.endpoint, params={"q": QUERY}, headers=hdr, timeout=T)
            assert r.status_code == 200
        assert r.headers["X-RateLimit-Remaining"] == "49, 0"
        r = requests.get(brave.endpoint, params={"q": QUERY}, headers=hdr, timeout=T)
        assert r.status_code == 429
        err = r.json()["error"]
        assert (err["code"], err["status"], err["meta"]["component"]) == (
            "QUOTA_LIMITED",
            429,
            "rate_limiter",
        )
        brave.reset()
        assert requests.get(brave.endpoint, params={"q": QUERY}, headers=hdr, timeout=T).status_code == 200


def google_get(google: GoogleCSEServer, **params: object) -> requests.Response:
    base: dict[str, object] = {"key": "gk", "cx": "engine-1", "q": QUERY, "searchType": "image"}
    base.update(params)
    return requests.get(google.endpoint, params={k: v for k, v in base.items() if v is not None}, timeout=T)


def test_google_pages_with_num_and_start(fox_urls: list[str]) -> None:
    with GoogleCSEServer({QUERY: fox_urls, "few": fox_urls[:3]}, "gk", cx="engine-1") as google:
        r = google_get(google, num=10, start=11)
        assert r.status_code == 200
        body = r.json()
        assert body["kind"] == "customsearch#search"
        assert [i["link"] for i in body["items"]] == fox_urls[10:20]
        item = body["items"][0]
        assert item["kind"] == "customsearch#result"
        assert item["displayLink"] == urlsplit(fox_urls[10]).netloc
        assert item["mime"] == "image/jpeg"
        assert item["image"]["contextLink"] == page_url(fox_urls[10])
        assert {"height", "width", "thumbnailLink"} <= set(item["image"])
        assert body["queries"]["request"][0]["startIndex"] == 11
        assert body["queries"]["nextPage"][0]["startIndex"] == 21
        assert [i["link"] for i in google_get(google).json()["items"]] == fox_urls[:10]
        last = google_get(google, start=91).json()
        assert [i["link"] for i in last["items"]] == fox_urls[90:100]
        assert "nextPage" not in last["queries"]
        assert google_get(google, start=92).status_code == 400
        assert google_get(google, num=11).status_code == 400
        assert google_get(google, start=0).status_code == 400
        assert google_get(google, cx="other").status_code == 400
        few = google_get(google, q="few").json()
        assert len(few["items"]) == 3
        assert "nextPage" not in few["queries"]
        assert "items" not in google_get(google, q="nothing").json()
        web = google_get(google, searchType=None).json()
        assert web["items"][0]["link"] == page_url(fox_urls[0])
        assert "image" not in web["items"][0]
        sent = google.search_requests()
        assert all(req.params["key"] == "gk" for req in sent)
        assert all("x-goog-api-key" not in req.headers for req in sent)


def test_google_auth_and_quota_errors(fox_urls: list[str]) -> None:
    with GoogleCSEServer({QUERY: fox_urls}, "gk", quota=1) as google:
        r = google_get(google, key=None)
        assert r.status_code == 403
        assert r.json()["error"]["status"] == "PERMISSION_DENIED"
        r = google_get(google, key="wrong")
        assert r.status_code == 400
        err = r.json()["error"]
        assert (err["code"], err["status"], err["errors"][0]["reason"]) == (
            400,
            "INVALID_ARGUMENT",
            "badRequest",
        )
        assert err["details"][0]["reason"] == "API_KEY_INVALID"
        assert google_get(google).status_code == 200
        r = google_get(google)
        assert r.status_code == 429
        err = r.json()["error"]
        assert (err["code"], err["status"]) == (429, "RESOURCE_EXHAUSTED")
        assert err["errors"][0]["reason"] == "rateLimitExceeded"
        assert "Queries per day" in err["message"]


def serp_get(serp: SerpApiServer, **params: object) -> requests.Response:
    base: dict[str, object] = {"engine": "google_images", "q": QUERY, "api_key": "sk"}
    base.update(params)
    return requests.get(serp.endpoint, params={k: v for k, v in base.items() if v is not None}, timeout=T)


def test_serpapi_pages_by_ijn(fox_urls: list[str]) -> None:
    licensed = {fox_urls[1]: "https://creativecommons.org/licenses/by/4.0/"}
    with SerpApiServer({QUERY: fox_urls}, "sk", license_details=licensed) as serp:
        pages = [serp_get(serp, ijn=i).json() for i in range(4)]
        assert [len(p.get("images_results", [])) for p in pages] == [100, 100, 50, 0]
        assert [x["original"] for x in pages[1]["images_results"]] == fox_urls[100:200]
        first = pages[0]["images_results"][1]
        assert first["position"] == 2
        assert first["link"] == page_url(fox_urls[1])
        assert first["license_details_url"] == licensed[fox_urls[1]]
        assert "license_details_url" not in pages[0]["images_results"][0]
        assert {"thumbnail", "source", "title", "original_width", "original_height"} <= set(first)
        assert all(p["search_metadata"]["status"] == "Success" for p in pages)
        assert pages[0]["serpapi_pagination"]["current"] == 0
        assert "ijn=1" in pages[0]["serpapi_pagination"]["next"]
        assert "next" not in pages[2]["serpapi_pagination"]
        assert pages[3]["error"] == SerpApiServer.NO_RESULTS
        assert serp_get(serp).json()["images_results"][0]["original"] == fox_urls[0]
        assert all(req.params["api_key"] == "sk" for req in serp.search_requests())


def test_serpapi_auth_validation_and_quota_errors(fox_urls: list[str]) -> None:
    with SerpApiServer({QUERY: fox_urls}, "sk", quota=1) as serp:
        for bad in ({"api_key": None}, {"api_key": "nope"}):
            r = serp_get(serp, **bad)
            assert r.status_code == 401
            assert r.json() == {"error": SerpApiServer.INVALID_KEY}
        r = serp_get(serp, q=None)
        assert (r.status_code, r.json()) == (400, {"error": "Missing query `q` parameter."})
        assert serp_get(serp, engine="google").status_code == 400
        assert serp_get(serp).status_code == 200
        r = serp_get(serp, ijn=1)
        assert (r.status_code, r.json()) == (429, {"error": "Your account has run out of searches."})
        assert serp.successful_calls == 1
