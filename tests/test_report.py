"""The HTML report in a real headless Chromium (Debian's, driven by Playwright), on the demo's real run.

The demo's ``cropclean clean`` run (conftest's ``demo_run``: 8 classes x 60 images) builds the report as
its last stage; ``cropclean report OUT --per-page 32`` then rebuilds it with smaller pages so that
pagination is walked. Pages are served by a loopback ``http.server`` (as a user would serve the folder),
every request the browser makes is watched, and screenshots land in ``test-artifacts/``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline import manifests

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PAGE_TIMEOUT_MS = 180_000
PER_PAGE = 32  # the demo's classes have about 63 crops each: two or three pages per class
# The first test also waits for the shared demo run (about 7.5 minutes on 2 cores) when it runs first.
pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def run(demo_run):
    from pipeline.cli import main

    out = demo_run.out
    built_by_clean = (out / "report" / "index.html").is_file()
    with contextlib.redirect_stdout(io.StringIO()) as again:
        assert main(["report", str(out), "--per-page", str(PER_PAGE)]) == 0
    return out, demo_run.stdout, demo_run.stderr, built_by_clean, again.getvalue()


@pytest.fixture(scope="module")
def served(run):
    out = run[0]
    handler = functools.partial(QuietHandler, directory=str(out / "report"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is not installed (make test installs it)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


class Watched:
    """A page whose console errors, page errors, failed requests and HTTP errors are collected."""

    def __init__(self, browser, base: str) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        # A wait ends as soon as the page is ready; its limit only stops a hang. Playwright's 30 s default
        # can run out while Chromium shares 2 busy cores with a training run.
        self.page.set_default_timeout(PAGE_TIMEOUT_MS)
        self.base, self.problems, self.requests = base, [], []
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("response", lambda r: r.status >= 400 and self.problems.append(f"{r.status}: {r.url}"))

    def open(self, name: str) -> None:
        self.page.goto(f"{self.base}/{name}", wait_until="load")
        # Lazy images load as they scroll into view; load every one, so every reference is checked.
        self.page.evaluate("document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager')")
        self.page.wait_for_function("Array.from(document.images).every(i => i.complete)")
        broken = self.page.evaluate(
            "Array.from(document.images).filter(i => i.getAttribute('src') && !i.naturalWidth)"
            ".map(i => i.src)"
        )
        assert not broken, broken

    def walk(self, first: str) -> list[str]:
        """Follow the pager's next links from ``first``; the names of every page seen."""
        names = [first]
        self.open(first)
        while (nxt := self.page.query_selector("nav.pager a[rel=next]")) is not None:
            names.append(nxt.get_attribute("href"))
            self.open(names[-1])
        return names


def _read(out: Path, name: str):
    return manifests.read_manifest(name, str(out / "manifests" / f"{name}.parquet"))


def test_clean_builds_the_report_and_prints_stage_progress_and_a_summary_table(run):
    out, stdout, stderr, built_by_clean, again = run
    assert built_by_clean
    for stage in ("sources", "normalize", "dedupe", "split", "train", "crop", "evaluate", "report"):
        assert f"stage {stage}: running" in stderr and f"stage {stage}: done in " in stderr, stage
    assert "stage sources: skipped (already complete)" in stderr  # the second call finds ingest done
    table = stdout[stdout.index("Stages\n") :].splitlines()
    rows = {
        line.split()[0]: line.split() for line in table[2:] if line.split() and line.split()[0] != "report:"
    }
    assert set(rows) >= {"sources", "normalize", "dedupe", "split", "train", "crop", "evaluate", "report"}
    assert all(r[1] == "ran" for r in rows.values()), rows  # the ingest stages ran in the first call
    assert f"report: {out / 'report' / 'index.html'}" in stdout
    assert "\r" not in stderr  # no redrawn bars in a captured (non-terminal) stream
    assert again.startswith(f"report: {out / 'report' / 'index.html'} (")


def test_index_loads_clean_with_counts_training_curves_and_table_iv(run, served, browser):
    out = run[0]
    w = Watched(browser, served)
    w.open("index.html")
    page = w.page
    images = _read(out, "images")
    what, n = page.locator(".count .what").all_inner_texts(), page.locator(".count .n").all_inner_texts()
    counts = dict(zip(what, n, strict=True))
    assert int(counts["inputs"]) == len(images)
    assert int(counts["rejected"]) == int((images["status"] == "rejected").sum()) > 0
    assert int(counts["blacklisted"]) == len(_read(out, "blacklist"))
    assert page.locator("svg.chart polyline").count() >= 2  # train and val curves of the member
    assert page.locator("svg.chart[aria-label^='top-1 on the test images'] rect title").count() >= 3
    assert all(u.startswith(served) for u in w.requests), [u for u in w.requests if not u.startswith(served)]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report-index.png"), full_page=True)
    assert (ARTIFACTS / "report-index.png").stat().st_size > 10_000
    assert not w.problems, w.problems


def test_every_gallery_page_shows_the_class_crops_of_the_manifest(run, served, browser):
    out = run[0]
    crops = _read(out, "crops")
    crops = crops[(crops["method"] == "fcn_ensemble") & (crops["target"] == "label")]
    classes = sorted(crops["label"].unique())
    w = Watched(browser, served)
    for i, cls in enumerate(classes):
        expected = int((crops["label"] == cls).sum())
        shown = []
        pages = w.walk(f"class-{i:03d}-p1.html")
        for name in pages:
            w.open(name)
            shown += w.page.locator(".grid figure.card").evaluate_all("cs => cs.map(c => c.dataset.imageId)")
        assert len(pages) == math.ceil(expected / PER_PAGE)
        assert sorted(shown) == sorted(crops.loc[crops["label"] == cls, "image_id"]), cls
        assert w.page.locator(".grid .box.crop").count() >= 1
    # Heatmaps load only on demand: none before the toggle, every one after it.
    w.open("class-000-p1.html")
    assert w.page.locator("img.heat[src]").count() == 0
    heat_requests = len([u for u in w.requests if "/heat/" in u])
    w.page.click("button.heat-toggle")
    w.page.wait_for_function("Array.from(document.querySelectorAll('img.heat')).every(i => i.complete)")
    assert w.page.locator("img.heat.shown").count() == w.page.locator("img.heat").count() > 0
    assert w.page.evaluate("Array.from(document.querySelectorAll('img.heat')).every(i => i.naturalWidth > 0)")
    assert len([u for u in w.requests if "/heat/" in u]) > heat_requests
    w.page.screenshot(path=str(ARTIFACTS / "report-gallery-heatmaps.png"))
    assert not w.problems, w.problems


def test_blacklist_review_page_lists_every_flagged_image_by_score_with_evidence(run, served, browser):
    out = run[0]
    blacklist = _read(out, "blacklist").sort_values("score", ascending=False, kind="stable")
    assert len(blacklist) > 0
    w = Watched(browser, served)
    shown, scores = [], []
    for name in w.walk("blacklist-p1.html"):
        w.open(name)
        rows = w.page.locator("tr.item")
        shown += rows.evaluate_all("rs => rs.map(r => r.dataset.imageId)")
        scores += [float(t.split()[1]) for t in w.page.locator("tr.item .score").all_inner_texts()]
    assert shown == list(blacklist["image_id"])
    assert scores == sorted(scores, reverse=True)
    w.open("blacklist-p1.html")
    first = blacklist.iloc[0]
    row = w.page.locator("tr.item").first
    assert row.locator(".lab.given").inner_text() == first["label"]
    if isinstance(first["suggested_label"], str):
        assert row.locator(".lab.suggested").inner_text() == first["suggested_label"]
    # Evidence: the given label's heatmap is shown (the ensemble ran on every flagged image).
    judged = blacklist[blacklist["votes"].notna()]
    assert w.page.locator("tr.item img.heat.shown").count() >= min(len(judged), PER_PAGE)
    w.page.screenshot(path=str(ARTIFACTS / "report-blacklist.png"), full_page=True)
    assert not w.problems, w.problems


def test_duplicate_groups_page_shows_each_group_side_by_side(run, served, browser):
    out = run[0]
    dups = _read(out, "duplicates")
    w = Watched(browser, served)
    groups = {}
    for name in w.walk("duplicates-p1.html"):
        w.open(name)
        for g in w.page.locator("section.group").all():
            groups[g.get_attribute("data-group-id")] = g.locator("figure.card").count()
    assert groups == dups.groupby("group_id").size().to_dict()
    assert not w.problems, w.problems
