"""Crawling end to end on a real local Ray instance: fake search APIs speaking each provider's documented
JSON, and a hostile image server, all on loopback. One row per URL, the right outcome for each, search
responses cached, keys never written, and per-URL resume across runs."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pandas as pd
import pytest

from pipeline import manifests
from pipeline.cli import main
from pipeline.config import build_config
from pipeline.crawl.providers import ProviderError
from pipeline.faults import FaultPlan
from pipeline.ingest import run_ingest
from tests.servers.hostile import ImageServer, image_bytes
from tests.servers.providers import BraveImageSearchServer, GoogleCSEServer, SerpApiServer

KEY = "sk-test-4f9a1c"  # a key that must never appear in any output
# Timeouts a loaded machine cannot break for a good URL on loopback (/slow, a byte every 2 s, still ends
# as a timeout: by the deadline), short enough that the hostile routes cost seconds, not minutes.
FAST_FETCH = {
    "allow_networks": ["127.0.0.1/32"], "connect_timeout": 3.0, "read_timeout": 3.0, "deadline": 6.0,
    "retries": 1, "backoff": 0.05, "max_retry_after": 2.0, "max_bytes": 4 * 2**20,
}  # fmt: skip

# Route -> (status, reason) the images manifest must show.
HOSTILE = {
    "/status/404": ("failed", "http_404"),
    "/status/500": ("failed", "http_5xx"),
    "/ratelimit/crawl": ("ok", None),
    "/flaky/crawl?fail=1": ("ok", None),
    "/slow": ("failed", "timeout"),
    "/loop/a": ("failed", "too_many_redirects"),
    "/to-private": ("rejected", "blocked_private_address"),
    "/to-metadata": ("rejected", "blocked_private_address"),
    "/huge": ("rejected", "too_large"),
    "/gzip-bomb": ("rejected", "too_large"),
    "/html-as-jpeg": ("rejected", "not_an_image"),
    "/truncated.jpg": ("rejected", "truncated"),
    "/image.svg": ("rejected", "unsupported_format"),
    "/bomb.png": ("rejected", "decompression_bomb"),
    "/noai.jpg": ("rejected", "robots_optout"),
    "/cmyk.jpg": ("ok", None),
    "/anim.gif": ("ok", None),
    "/plain.jpg": ("ok", None),
}


@pytest.fixture(scope="module")
def images():
    with ImageServer() as srv:
        yield srv


def read(out: Path, name: str) -> pd.DataFrame:
    return manifests.read_manifest(name, str(out / "manifests" / f"{name}.parquet"))


def search_config(out: Path, provider: str, per_class: int, *sets: str):
    doc = {
        "out": str(out),
        "sources": [
            {"kind": "search", "classes": ["ramen", "pho"], "provider": provider, "per_class": per_class}
        ],
        "fetch": FAST_FETCH,
        "balance": {"min_per_class": 0},
    }
    return build_config(doc, preset="cpu-small", sets=list(sets))


class PeakRSS:
    """Peak resident memory of any one Ray worker process, sampled from /proc every 50 ms."""

    def __init__(self) -> None:
        self.peak_worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    cmd = (proc / "cmdline").read_bytes()
                    if b"ray::" in cmd or b"default_worker.py" in cmd:
                        status = (proc / "status").read_text()
                        kib = int(status.split("VmRSS:")[1].split()[0]) if "VmRSS:" in status else 0
                        self.peak_worker = max(self.peak_worker, kib * 1024)
                except (OSError, IndexError, ValueError):
                    continue  # the process ended meanwhile
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


PROVIDERS = {
    "brave": (BraveImageSearchServer, {"BRAVE_API_KEY": KEY}, "CROPCLEAN_BRAVE_ENDPOINT"),
    "google": (
        GoogleCSEServer,
        {"GOOGLE_CSE_KEY": KEY, "GOOGLE_CSE_CX": "cx-1"},
        "CROPCLEAN_GOOGLE_ENDPOINT",
    ),
    "serpapi": (SerpApiServer, {"SERPAPI_KEY": KEY}, "CROPCLEAN_SERPAPI_ENDPOINT"),
}


@pytest.mark.parametrize("provider", ["brave", "google", "serpapi"])
def test_search_crawl_every_url_one_row_with_the_right_outcome(
    provider, images, ray_local, tmp_path, monkeypatch
):
    ramen = [images.url(f"/img/ramen-{i}.jpg") for i in range(22)] + [images.url(p) for p in HOSTILE]
    pho = [images.url(f"/img/pho-{i}.jpg") for i in range(12)]
    cls, env, endpoint_var = PROVIDERS[provider]
    with cls({"ramen": ramen, "pho": pho}, keys=KEY) as api:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv(endpoint_var, api.endpoint)
        out = tmp_path / "run"
        images.reset()
        with PeakRSS() as mem:
            run_ingest(search_config(out, provider, per_class=60))
        rows = read(out, "images").set_index("source_key")
        assert len(rows) == len(ramen) + len(pho) and rows.index.is_unique  # one row per URL
        for path, (status, reason) in HOSTILE.items():
            got = rows.loc[images.url(path)]
            assert (got["status"], got["reason"] if pd.notna(got["reason"]) else None) == (status, reason), (
                path
            )
        good = rows.loc[[u for u in ramen + pho if "/img/" in u]]
        assert (good["status"] == "ok").all()
        assert set(good["engine"]) == {provider} and good["page_url"].notna().all()
        assert set(rows["query"]) == {"ramen", "pho"} and rows["rank"].min() == 1
        assert mem.peak_worker < 1.5 * 2**30, mem.peak_worker  # a 4 GiB body and a gzip bomb stayed capped
        if provider == "google":  # 10 per page: paging went past the first page
            assert {r.params.get("start") for r in api.search_requests()} >= {"1", "11", "21"}
        calls, hits = len(api.search_requests()), dict(images.hits)

        # Another run whose search settings changed: the search stage runs again, from the cache.
        run_ingest(search_config(out, provider, per_class=50))
        assert len(api.search_requests()) == calls  # search answered from the cache: no quota spent
        assert images.hits["/img/ramen-0.jpg"] == hits["/img/ramen-0.jpg"] == 1  # ok URLs never refetched
    # The key is in no file the run wrote.
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".parquet", ".json", ".yaml"):
            assert KEY.encode() not in path.read_bytes(), path


def test_auth_failure_stops_with_a_clear_message_and_no_key(images, tmp_path, monkeypatch, capsys):
    with BraveImageSearchServer({"ramen": [images.url("/img/a.jpg")]}, keys="the-right-key") as api:
        monkeypatch.setenv("BRAVE_API_KEY", KEY)
        monkeypatch.setenv("CROPCLEAN_BRAVE_ENDPOINT", api.endpoint)
        code = main(["crawl", "--classes", "ramen", "--provider", "brave", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "brave: authentication failed" in err and "BRAVE_API_KEY" in err
    assert KEY not in err
    monkeypatch.delenv("BRAVE_API_KEY")
    assert main(["crawl", "--classes", "ramen", "--out", str(tmp_path / "r2")]) == 1
    assert "set BRAVE_API_KEY" in capsys.readouterr().err


def test_quota_stops_the_provider_keeps_results_and_resumes(images, ray_local, tmp_path, monkeypatch):
    urls = [images.url(f"/img/q-{i}.jpg") for i in range(30)]
    with GoogleCSEServer({"ramen": urls, "pho": []}, keys=KEY, quota=2) as api:
        monkeypatch.setenv("GOOGLE_CSE_KEY", KEY)
        monkeypatch.setenv("GOOGLE_CSE_CX", "cx-1")
        monkeypatch.setenv("CROPCLEAN_GOOGLE_ENDPOINT", api.endpoint)
        out = tmp_path / "run"
        report, _ = run_ingest(search_config(out, "google", per_class=30))
        result = report.results["sources"]
        assert result.incomplete and "quota" in result.errors[0] and KEY not in result.errors[0]
        assert len(read(out, "images")) == 20  # two pages of ten made it
        images.reset()
        api.quota = None  # the quota resets
        report, _ = run_ingest(search_config(out, "google", per_class=30))
        assert not report.results["sources"].incomplete
        assert len(read(out, "images")) == 30
        assert report.results["normalize"].stats["reused"] == 20  # only the new URLs were fetched
        assert sum(images.hits.values()) == 10


def url_list_config(tmp_path: Path, urls: list[str], *sets: str):
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"{u},ramen\n" for u in urls))
    doc = {"out": str(tmp_path / "run"), "sources": [{"uri": str(listing)}], "fetch": FAST_FETCH}
    return build_config(doc, preset="cpu-small", sets=["balance.min_per_class=0", *sets])


def test_url_list_crawl_resumes_per_url_after_a_crash(images, ray_local, tmp_path):
    images.reset()
    good = [images.url(f"/img/r-{i}.jpg") for i in range(40)]
    cfg = url_list_config(tmp_path, good, "normalize.shard_size=8")
    # The last of five shards fails. Shards start in order, at most one per CPU: by the time it starts
    # (and fails at once), earlier ones have finished, however slow the machine; an early shard failing
    # could stop the stage before any other finished. What the first run kept is read from its ledger,
    # not from the server's counts: a shard still in flight when the stage stopped may have fetched
    # without writing its rows.
    with pytest.raises(Exception, match="injected failure in normalize shard 4"):
        run_ingest(cfg, faults=FaultPlan(frozenset({("normalize", 4)})))
    ledger = next((Path(cfg.out) / "stages" / "normalize").glob("ledger-*"))
    kept = set(pd.concat([pd.read_parquet(p) for p in ledger.glob("part-*.parquet")])["source_key"])
    assert 0 < len(kept) <= len(good) - 8 and sum(images.hits.values()) < len(good)

    report, _ = run_ingest(cfg)
    assert report.results["normalize"].stats["processed"] == len(good) - len(kept)
    assert all(images.hits[u.removeprefix(images.base_url)] == 1 for u in kept)  # kept URLs never refetched
    assert all(images.hits[f"/img/r-{i}.jpg"] >= 1 for i in range(40))
    assert (read(Path(cfg.out), "images")["status"] == "ok").all()


def test_failed_urls_are_retried_in_later_runs_up_to_the_cap(images, ray_local, tmp_path):
    images.reset()
    good = [images.url(f"/img/t-{i}.jpg") for i in range(10)]
    flaky, broken = images.url("/flaky/later?fail=2"), images.url("/status/503")
    cfg = url_list_config(tmp_path, [*good, flaky, broken], "fetch.retries=0", "fetch.max_attempts=3")
    out = Path(cfg.out)
    for run in (1, 2):
        report, _ = run_ingest(cfg)
        result = report.results["normalize"]
        assert result.stats["processed"] == (12 if run == 1 else 2) and result.incomplete
        rows = read(out, "images").set_index("source_key")
        assert rows.loc[flaky, ["status", "reason", "attempts"]].tolist() == ["failed", "http_5xx", run]
    report, _ = run_ingest(cfg)  # third run: the flaky URL answers; the broken one reaches the cap
    rows = read(out, "images").set_index("source_key")
    assert rows.loc[flaky, ["status", "attempts"]].tolist() == ["ok", 3]
    assert rows.loc[broken, ["status", "reason", "attempts"]].tolist() == ["failed", "http_5xx", 3]
    assert not report.results["normalize"].incomplete
    assert report.ran == ["normalize", "dedupe", "split"]  # later stages re-ran on the new output
    assert all(images.hits[f"/img/t-{i}.jpg"] == 1 for i in range(10))  # ok URLs were never fetched again
    assert images.hits["/flaky/later"] == 3 and images.hits["/status/503"] == 3
    report, _ = run_ingest(cfg)  # nothing left to do
    assert report.ran == []


def test_url_list_locators_that_may_not_be_read_and_malformed_urls_are_final_rows(
    images, ray_local, tmp_path
):
    """A URL list from a stranger: nothing outside the list's folder is read, nothing reaches a blocked
    address, and URLs that cannot be fetched become one final row each instead of halting the stage."""
    lists = tmp_path / "lists"
    (lists / "imgs").mkdir(parents=True)
    (lists / "imgs" / "inside.jpg").write_bytes(image_bytes("inside"))
    (tmp_path / "secret.jpg").write_bytes(image_bytes("secret"))  # a readable image, outside
    with ImageServer(host="127.0.0.2") as blocked:  # loopback, but not in the allowed 127.0.0.1/32
        refused = [
            f"simplecache::http://127.0.0.2:{blocked.port}/img/secret.jpg",
            "file:///etc/hostname",
            "/etc/hostname",
            "../../../../etc/hostname",
            "../secret.jpg",
            f"file://{tmp_path}/secret.jpg",
            str(tmp_path / "secret.jpg"),
        ]
        malformed = [
            "http://host:99999/x.jpg",
            "http://host:abc/",
            "http://[::1/x",
            "http://exa\u200dmple.com/a.jpg",
        ]
        rate_limited = images.url("/echo?" + urlencode([("status", "429"), ("h", "Retry-After: garbage")]))
        good = ["imgs/inside.jpg", images.url("/img/list-good.jpg")]
        listing = lists / "urls.txt"
        listing.write_text("".join(f"{u},ramen\n" for u in [*refused, *malformed, rate_limited, *good]))
        doc = {"out": str(tmp_path / "run"), "sources": [{"uri": str(listing)}], "fetch": FAST_FETCH}
        cfg = build_config(doc, preset="cpu-small", sets=["balance.min_per_class=0", "fetch.max_attempts=3"])

        report, _ = run_ingest(cfg)
        rows = read(Path(cfg.out), "images").set_index("source_key")
        assert len(rows) == len(refused) + len(malformed) + 1 + len(good) and rows.index.is_unique
        for entry in refused:
            row = rows.loc[entry]
            assert (row["status"], row["reason"]) == ("rejected", "unsupported_url"), entry
            assert row["detail"] and pd.isna(row["bytes"]) and pd.isna(row["sha256"]), entry  # never read
        assert sum(blocked.hits.values()) == 0
        for url in malformed:
            assert rows.loc[url, ["status", "reason", "attempts"]].tolist() == ["failed", "bad_url", 1], url
        assert rows.loc[rate_limited, ["status", "reason"]].tolist() == ["failed", "http_429"]
        assert (rows.loc[good, "status"] == "ok").all()
        assert report.results["normalize"].retry_later == 1  # the 429 only

        report, _ = run_ingest(cfg)  # the 429 is tried again; nothing final is
        assert report.results["normalize"].stats["processed"] == 1
        rows = read(Path(cfg.out), "images").set_index("source_key")
        assert rows.loc[rate_limited, "attempts"] == 2
        assert (rows.loc[malformed, "attempts"] == 1).all() and (rows.loc[refused, "attempts"] == 1).all()
        assert sum(blocked.hits.values()) == 0


def test_provider_errors_are_typed():
    from pipeline.crawl.providers import make_provider

    with pytest.raises(ProviderError, match="unknown provider 'bing'"):
        make_provider("bing", {})
    with pytest.raises(ProviderError, match="set GOOGLE_CSE_KEY and GOOGLE_CSE_CX"):
        make_provider("google", {})
