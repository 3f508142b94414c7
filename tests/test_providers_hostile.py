"""Hostile search providers: answers of the wrong shape, image URLs that are not http(s), a cache edited
by hand, redirects that would carry the key elsewhere, a provider that ignores paging. Real HTTP over
loopback (tests/servers/providers.py); the sources stage runs without Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline import storage
from pipeline.config import build_config
from pipeline.crawl.providers import MAX_KEY_CHARS, ProviderError, _cache_uri, make_provider, search
from pipeline.imaging import NormalizeParams
from pipeline.stages.base import RunContext, StageResult
from pipeline.stages.normalize import process_candidate
from pipeline.stages.sources import SourcesStage
from tests.servers.hostile import image_bytes
from tests.servers.providers import BraveImageSearchServer, GoogleCSEServer, SerpApiServer

KEY = "sk-hostile-7d2e90"  # must never reach another host or any message

SERVERS = {"brave": BraveImageSearchServer, "google": GoogleCSEServer, "serpapi": SerpApiServer}
ENVS = {
    "brave": {"BRAVE_API_KEY": KEY},
    "google": {"GOOGLE_CSE_KEY": KEY, "GOOGLE_CSE_CX": "cx-1"},
    "serpapi": {"SERPAPI_KEY": KEY},
}
ENDPOINT_ENVS = {
    "brave": "CROPCLEAN_BRAVE_ENDPOINT",
    "google": "CROPCLEAN_GOOGLE_ENDPOINT",
    "serpapi": "CROPCLEAN_SERPAPI_ENDPOINT",
}


def use(monkeypatch: pytest.MonkeyPatch, provider: str, endpoint: str) -> None:
    for name, value in ENVS[provider].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(ENDPOINT_ENVS[provider], endpoint)


def sources_context(tmp_path: Path, provider: str = "brave", per_class: int = 50) -> RunContext:
    doc = {
        "out": str(tmp_path / "run"),
        "sources": [{"kind": "search", "classes": ["ramen"], "provider": provider, "per_class": per_class}],
    }
    return RunContext(build_config(doc, preset="cpu-small"))


def run_sources(ctx: RunContext) -> tuple[StageResult, pd.DataFrame]:
    result = SourcesStage().run(ctx)
    return result, pd.read_parquet(ctx.layout.candidates)


# (provider, HTTP status, answer, what the error must say after "<provider>: ")
WRONG_SHAPES = [
    ("brave", 200, {"error": "text"}, "unexpected answer: error: text"),
    ("brave", 200, {"results": ["x"]}, "unexpected answer: results[0] is a string, not an object"),
    ("brave", 200, {"results": "x"}, "unexpected answer: results is a string, not a list"),
    ("brave", 200, {"results": [{"url": "http://a/p"}, {"properties": "x"}]},
     "unexpected answer: results[1].properties is a string, not an object"),
    ("brave", 200, {"results": [{"properties": {"url": "http://a/i.jpg"}, "url": 5}]},
     "unexpected answer: results[0].url is a number, not a string"),
    ("brave", 200, [1, 2], "unexpected answer (HTTP 200, a list, not an object)"),
    ("brave", 200, b"<html>not json</html>", "unexpected answer (HTTP 200, not JSON)"),
    ("brave", 200, b"[" * 100_000, "unexpected answer (HTTP 200, not JSON)"),  # deeper than the parser
    ("google", 500, {"error": "text"}, "error (HTTP 500). text"),
    ("google", 403, {"error": {"errors": [{"reason": ["keyInvalid"]}], "message": "no"}},
     "error (HTTP 403). no"),
    ("google", 200, {"error": {"message": "boom"}}, "unexpected answer: error: boom"),
    ("google", 200, {"items": "x"}, "unexpected answer: items is a string, not a list"),
    ("google", 200, {"items": [{"link": "http://a/i.jpg", "image": []}]},
     "unexpected answer: items[0].image is a list, not an object"),
    ("serpapi", 200, {"images_results": [1]},
     "unexpected answer: images_results[0] is a number, not an object"),
    ("serpapi", 200, {"images_results": [{"original": "http://a/i.jpg", "link": {"a": 1}}]},
     "unexpected answer: images_results[0].link is an object, not a string"),
    ("serpapi", 200, {"error": "Your searches are paused."}, "error (HTTP 200). Your searches are paused."),
]  # fmt: skip


@pytest.mark.parametrize(("provider", "status", "answer", "message"), WRONG_SHAPES)
def test_an_answer_of_the_wrong_shape_is_a_provider_error(provider, status, answer, message, tmp_path,
                                                          monkeypatch):  # fmt: skip
    with SERVERS[provider]({}, keys=KEY) as api:
        api.answer_with(answer, status)
        use(monkeypatch, provider, api.endpoint)
        # Nothing found at all: the sources stage stops with the provider's error (the CLI prints it).
        with pytest.raises(ProviderError) as caught:
            SourcesStage().run(sources_context(tmp_path, provider))
    assert str(caught.value) == f"{provider}: {message}"
    assert KEY not in str(caught.value)


def test_a_wrong_shape_is_one_line_from_the_cli(ray_local, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    with BraveImageSearchServer({}, keys=KEY) as api:
        api.answer_with({"results": [{"properties": {"url": ["http://a/i.jpg"]}}, None]})
        use(monkeypatch, "brave", api.endpoint)
        code = main(["crawl", "--classes", "ramen", "--provider", "brave", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "cropclean: brave: unexpected answer: results[1] is null, not an object" in err.splitlines()


def test_a_wrong_page_after_good_ones_keeps_the_good_ones(tmp_path, monkeypatch):
    good = [f"http://127.0.0.1:9/img/{i}.jpg" for i in range(200)]
    with BraveImageSearchServer({"ramen": good}, keys=KEY) as api:
        use(monkeypatch, "brave", api.endpoint)
        provider = make_provider("brave")
        hits, error = search(provider, "ramen", 200, str(tmp_path / "cache"))  # page 0 is fine
        assert len(hits) == 200 and error is None
        api.answer_with({"results": {"oops": 1}})
        hits, error = search(provider, "ramen", 300, str(tmp_path / "cache"))  # page 0 cached, page 1 bad
    assert len(hits) == 200
    assert error == "brave: unexpected answer: results is an object, not a list"


def refused_urls(secret: Path) -> list[str]:
    """Image URLs a hostile provider may answer with, each naming a real image on this machine."""
    return [
        secret.as_uri(),
        f"simplecache::{secret.as_uri()}",
        f"FILE://{secret}",
        str(secret),
        "img/relative.jpg",
        "data:image/jpeg;base64,/9j/4AAQ",
        f"memory://{secret}",
        " http://127.0.0.1:9/leading-space.jpg",
    ]


@pytest.mark.parametrize("provider", ["brave", "google", "serpapi"])
def test_image_urls_that_are_not_http_are_refused_at_the_source(provider, tmp_path, monkeypatch):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(image_bytes("secret"))  # a good image: opened, it would come out "ok"
    good = "http://127.0.0.1:9/img/good.jpg"
    urls = [*refused_urls(secret), "http:///no-host.jpg", good]
    with SERVERS[provider]({"ramen": urls}, keys=KEY) as api:
        use(monkeypatch, provider, api.endpoint)
        ctx = sources_context(tmp_path, provider)
        stats, rows = run_sources(ctx)
    assert not stats.errors and len(rows) == len(urls)
    by_key = rows.set_index("source_key")
    assert set(by_key.loc[refused_urls(secret), "reason"]) == {"unsupported_url"}
    assert by_key.loc["http:///no-host.jpg", "reason"] == "bad_url"
    assert pd.isna(by_key.loc[good, "reason"])
    assert (
        by_key.loc[f"simplecache::{secret.as_uri()}", "detail"] == "not an http(s) URL (scheme 'simplecache')"
    )
    # The normalize stage writes each refused row as rejected without opening it.
    for cand in rows[rows["reason"].notna()].to_dict("records"):
        out = process_candidate(cand, NormalizeParams(), 2**20, str(tmp_path / "run"))
        assert (out["status"], out["reason"]) == ("rejected", cand["reason"]), cand["source_key"]
        assert out.get("sha256") is None


def test_image_urls_that_are_not_text_are_refused_with_a_string_key(tmp_path, monkeypatch):
    long_url = "http://127.0.0.1:9/" + "a" * 10_000
    values = [{"href": "http://127.0.0.1:9/a.jpg"}, 42, ["http://127.0.0.1:9/b.jpg"], True, 1.5,
              {"huge": "x" * 50_000}, long_url, "http://127.0.0.1:9/\ud800.jpg"]  # fmt: skip
    answer = {"results": [{"properties": {"url": v}, "url": None} for v in values]}
    with BraveImageSearchServer({}, keys=KEY) as api:
        api.answer_with(answer)
        use(monkeypatch, "brave", api.endpoint)
        stats, rows = run_sources(sources_context(tmp_path))
    assert not stats.errors and len(rows) == len(values)
    assert rows["source_key"].map(type).eq(str).all()
    assert rows["source_key"].str.len().max() <= MAX_KEY_CHARS
    assert rows["reason"].tolist() == ["unsupported_url"] * 6 + ["bad_url"] * 2
    assert rows["detail"].iloc[0] == "the image URL is an object, not text"
    assert rows["source_key"].iloc[1] == "42"
    assert rows["image_id"].nunique() == len(values)


def test_a_cached_page_is_checked_like_an_answer(tmp_path, monkeypatch):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(image_bytes("secret"))
    ctx = sources_context(tmp_path)
    cache_dir = ctx.layout.search_cache
    page0 = _cache_uri(cache_dir, "brave", "ramen", 0)
    with BraveImageSearchServer({"ramen": ["http://127.0.0.1:9/img/fresh.jpg"]}, keys=KEY) as api:
        use(monkeypatch, "brave", api.endpoint)
        # A hand-edited page whose rows are well formed: a file URL in it is refused like a served one.
        storage.write_text_atomic(page0, json.dumps([[secret.as_uri(), None, None], [{"a": 1}, None, None]]))
        _, rows = run_sources(ctx)
        assert rows["reason"].tolist() == ["unsupported_url", "unsupported_url"]
        assert rows["source_key"].tolist() == [secret.as_uri(), "{'a': 1}"]
        assert api.search_requests() == []  # served from the cache
        # Pages that are not pages at all are asked for again (and replaced), never trusted.
        for bad in ['{"x": 1}', "[[1, 2]]", '[["http://127.0.0.1:9/i.jpg", 5, null]]', "not json", "["]:
            storage.write_text_atomic(page0, bad)
            _, rows = run_sources(ctx)
            assert rows["source_key"].tolist() == ["http://127.0.0.1:9/img/fresh.jpg"], bad
            assert rows["reason"].isna().all()
        assert len(api.search_requests()) == 5
        fresh = ["http://127.0.0.1:9/img/fresh.jpg", "http://127.0.0.1:9/page/fresh.html", None]
        assert json.loads(storage.read_text(page0)) == [fresh]


@pytest.mark.parametrize("provider", ["brave", "google", "serpapi"])
@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_request_with_the_key_never_follows_a_redirect(provider, status, tmp_path):
    results = {"ramen": ["http://127.0.0.1:9/img/a.jpg"]}
    with SERVERS[provider](results, keys=KEY) as api, SERVERS[provider](results, keys=KEY) as elsewhere:
        api.redirect_to, api.redirect_status = elsewhere.endpoint, status
        env = {**ENVS[provider], ENDPOINT_ENVS[provider]: api.endpoint}
        provider_ = make_provider(provider, env)
        with pytest.raises(ProviderError) as caught:
            provider_.fetch_page("ramen", 0)
        hits, error = search(provider_, "ramen", 10, str(tmp_path / "cache"))
        assert len(api.search_requests()) == 2  # the key went to the configured endpoint only
        assert elsewhere.requests == []  # and never on: no header, no query parameter arrived there
    message = str(caught.value)
    assert message.startswith(
        f"{provider}: the endpoint redirected (HTTP {status} to 127.0.0.1:{elsewhere.port})"
    )
    assert ENDPOINT_ENVS[provider] in message and KEY not in message
    assert hits == [] and error == message


def test_a_key_echoed_in_an_error_is_blanked():
    with BraveImageSearchServer({}, keys=KEY) as api:
        api.answer_with({"error": {"code": "X", "detail": f"token {KEY} is not valid"}}, status=401)
        provider = make_provider("brave", {"BRAVE_API_KEY": KEY, "CROPCLEAN_BRAVE_ENDPOINT": api.endpoint})
        with pytest.raises(ProviderError) as caught:
            provider.fetch_page("ramen", 0)
    assert KEY not in str(caught.value)
    assert str(caught.value).endswith("token [redacted] is not valid")


def test_a_provider_that_ignores_paging_stops_the_paging(tmp_path):
    # The same full page whatever the page number: paging on would spend the quota on repeats.
    page = {"images_results": [{"original": f"http://127.0.0.1:9/img/{i}.jpg"} for i in range(100)]}
    with SerpApiServer({}, keys=KEY, quota=5) as api:
        api.answer_with(page)
        provider = make_provider("serpapi", {"SERPAPI_KEY": KEY, "CROPCLEAN_SERPAPI_ENDPOINT": api.endpoint})
        hits, error = search(provider, "ramen", 1000, str(tmp_path / "cache"))
        assert len(api.search_requests()) == 2
    assert len(hits) == 100 and error is None
