"""Report pages at scale, without a run: 20,000 images in 10 classes build into small paginated pages."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from pipeline import storage
from pipeline.report import _render
from pipeline.report.data import RunData
from pipeline.report.pages import PageBuilder, pager
from tests.conftest import ingest_config

N, CLASSES, PER_PAGE = 20_000, 10, 100


def large_run(tmp_path) -> RunData:
    rng = np.random.default_rng(0)
    ids = [f"{i:016x}" for i in range(N)]
    labels = [f"class_{i % CLASSES}" for i in range(N)]
    splits = rng.choice(["train", "val", "test"], N, p=[0.7, 0.1, 0.2])
    images = pd.DataFrame({"image_id": ids, "label": labels, "split": splits, "status": "ok", "reason": None,
                           "width": 170, "height": 128, "path": [f"blobs/{i}.jpg" for i in ids]})  # fmt: skip
    x0 = rng.integers(0, 100, N)
    crops = images[["image_id", "label", "split", "width", "height"]].assign(
        x0=x0, y0=10, x1=x0 + 64, y1=74, score=rng.random(N), reason=None, path="cropped/x.jpg"
    )
    flagged = images.sample(300, random_state=0)
    blacklist = (
        flagged[["image_id", "label", "split", "width", "height"]]
        .assign(
            reason="label_not_found",
            score=rng.random(300),
            suggested_label="class_0",
            suggested_score=0.9,
            votes=0,
            suggested_votes=2,
            evidence="",
            path="blobs/x.jpg",
        )
        .sort_values("score", ascending=False)
    )
    groups = pd.DataFrame({"image_id": ids[:400], "group_id": [ids[2 * (i // 2)] for i in range(400)],
                           "kept_id": [ids[2 * (i // 2)] for i in range(400)], "kind": "near", "distance": 3,
                           "cross_label": False, "cross_split": False})  # fmt: skip
    cfg = ingest_config(tmp_path / "src", tmp_path / "out")
    return RunData(out=str(tmp_path / "out"), cfg=cfg, images=images, duplicates=groups, crops=crops,
                   searched=crops.iloc[:0], blacklist=blacklist.reset_index(drop=True),
                   predictions=pd.DataFrame(), metrics={})  # fmt: skip


def counted(fn: Callable[..., Any], built: Counter[str], name: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        built[name] += 1
        return fn(*args, **kwargs)

    return wrapper


def test_twenty_thousand_images_make_small_pages_quickly(tmp_path, monkeypatch):
    run = large_run(tmp_path)
    built: Counter[str] = Counter()  # the work: cards and review rows built, pages rendered
    for name in ("_gallery_card", "_review_row"):
        monkeypatch.setattr(PageBuilder, name, counted(getattr(PageBuilder, name), built, name))
    monkeypatch.setattr(storage, "write_text_atomic", counted(storage.write_text_atomic, built, "written"))
    # CPU time of this thread, not wall time: other processes on a busy machine do not count.
    start = time.thread_time()
    pages = PageBuilder(run, PER_PAGE, heats=set(), thumbs=set(run.images["image_id"])).pages("now")
    _render(pages, str(tmp_path / "report"))
    seconds = time.thread_time() - start
    # Each card and review row is built once, and each page rendered once, whatever the page count.
    assert built == {"_gallery_card": N, "_review_row": 300, "written": len(pages) + 2}  # + css and js
    galleries = [p for p in pages if p.template == "gallery.html"]
    assert len(galleries) == CLASSES * (N // CLASSES // PER_PAGE)
    assert all(len(p.context["cards"]) == PER_PAGE for p in galleries)
    assert sum(len(p.context["cards"]) for p in galleries) == N
    review = [p for p in pages if p.template == "blacklist.html"]
    assert [len(p.context["rows"]) for p in review] == [100, 100, 100]
    assert [r["rank"] for p in review for r in p.context["rows"]] == list(range(1, 301))
    # Each page stays small: thumbnails by reference, ~100 cards.
    sizes = [(tmp_path / "report" / p.name).stat().st_size for p in galleries]
    assert max(sizes) < 120_000, max(sizes)
    html = (tmp_path / "report" / galleries[0].name).read_text()
    assert len(re.findall(r'<figure class="card', html)) == PER_PAGE
    assert 'rel="next"' in html and "https://" not in html and "http://" not in html
    assert seconds < 15, seconds  # measured: 1.3 CPU s (6.5 s of wall time on 2 busy shared cores)


def test_pager_links_neighbours_only_where_they_exist():
    name = "p{}.html".format
    assert pager(250, 100, 1, name) == {
        "number": 1,
        "pages": 3,
        "total": 250,
        "prev": None,
        "next": "p2.html",
    }
    assert pager(250, 100, 3, name)["next"] is None and pager(250, 100, 3, name)["prev"] == "p2.html"
    assert pager(0, 100, 1, name)["pages"] == 1
