"""The guarded fetcher against a hostile image server on loopback: every route gets the right outcome."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from pipeline.crawl.fetch import Fetcher, FetchParams, robots_optout
from pipeline.crawl.guard import BlockedAddress, NetworkGuard
from pipeline.imaging import Normalized, NormalizeParams, normalize_bytes
from pipeline.reasons import Reason, Status
from tests.servers.hostile import ImageServer

FAST = FetchParams(
    connect_timeout=1.0, read_timeout=1.0, deadline=5.0, retries=1, backoff=0.05, max_retry_after=3.0,
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
    start = time.monotonic()
    got = fetch(fetcher, server, path)
    assert (got.status, got.reason) == (status, reason), got
    assert got.data is None
    assert time.monotonic() - start < FAST.deadline + 2  # the per-URL deadline holds, retries included


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
    # serves at once must not time out for having queued.
    params = FetchParams(read_timeout=0.6, deadline=0.5, retries=0, per_host=1, per_host_delay=0.8)
    fetcher = Fetcher(params, NetworkGuard.from_cidrs(["127.0.0.1/32"]))
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            stalled = pool.submit(fetch, fetcher, server, "/stall")
            time.sleep(0.1)  # /stall takes the one slot first and holds it until the deadline cuts it off
            queued = [pool.submit(fetch, fetcher, server, f"/img/queued-{i}.jpg") for i in range(2)]
            assert (stalled.result().status, stalled.result().reason) == (Status.FAILED, Reason.TIMEOUT)
            for got in queued:  # each waited > 0.5 s for the slot and the delay before its request
                assert got.result().status == Status.OK and decodes(got.result().data)
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
