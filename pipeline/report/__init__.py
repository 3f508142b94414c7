"""The HTML report of a run: ``OUT/report/index.html`` and its pages, static and self-contained.

Pages: the run summary (counts at each stage, rejection reasons, duplicate groups, per-class counts,
training curves, Table IV), per-class galleries of crops (the crop box on each image, heatmap overlays
on demand), duplicate groups side by side, and the blacklist review page sorted by score. Everything
lives under ``OUT/report/`` with relative links: thumbnails, overlays, one stylesheet and one script;
nothing is fetched from the network. Galleries are paginated and show thumbnails, so pages stay light
at tens of thousands of images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from pipeline import storage
from pipeline.layout import RunLayout
from pipeline.report.data import RunData, read_run
from pipeline.report.heatmaps import HeatJob, heat_name, make_heatmaps
from pipeline.report.pages import INDEX, PageBuilder
from pipeline.report.thumbs import make_thumbnails

HERE = Path(__file__).resolve().parent
PER_PAGE = 100  # images per gallery or review page
HEATMAP_LIMIT = 400  # gallery images with an overlay (every blacklisted image gets its own)


@dataclass
class ReportResult:
    index: str  # URI of index.html
    pages: int
    thumbnails: int  # made this time (existing ones are kept)
    heatmaps: int  # images run through the ensemble this time
    seconds: float


def report_dir(out: str) -> str:
    return RunLayout(out).report_dir


def heat_jobs(run: RunData, limit: int) -> list[HeatJob]:
    """Overlays to draw: given and suggested label of every blacklisted image, then the label of gallery
    images, spread over the classes' first pages, up to ``limit``."""
    paths = dict(zip(run.images["image_id"], run.images["path"], strict=True))
    jobs: dict[str, set[str]] = {}
    for r in run.blacklist.itertuples():
        jobs.setdefault(r.image_id, set()).add(r.label)
        if isinstance(r.suggested_label, str):
            jobs[r.image_id].add(r.suggested_label)
    boxed = run.crops[run.crops["x0"].notna()].sort_values(["split", "image_id"])
    per_class = boxed.groupby("label", group_keys=False).cumcount()  # gallery order within each class
    for r in boxed.assign(rank=per_class).sort_values(["rank", "label"]).head(max(0, limit)).itertuples():
        jobs.setdefault(r.image_id, set()).add(r.label)
    return [HeatJob(i, paths[i], tuple(sorted(c))) for i, c in jobs.items() if isinstance(paths.get(i), str)]


def _render(pages: list, target: str) -> None:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    for page in pages:
        html = env.get_template(page.template).render(**page.context)
        storage.write_text_atomic(storage.join(target, page.name), html)
    for asset in ("report.css", "report.js"):
        storage.write_text_atomic(storage.join(target, asset), (HERE / "assets" / asset).read_text())


def build_report(out: str, per_page: int = PER_PAGE, heatmap_limit: int = HEATMAP_LIMIT) -> ReportResult:
    """Write ``OUT/report/`` from the run's manifests and metrics; re-running reuses thumbnails and
    overlays already there (image ids derive from content)."""
    if per_page < 1:
        raise ValueError(f"report: per_page must be at least 1, got {per_page}")
    start = time.perf_counter()
    run = read_run(out)
    target = report_dir(out)
    paths = dict(zip(run.images["image_id"], run.images["path"], strict=True))
    shown = [*run.crops["image_id"], *run.duplicates["image_id"], *run.blacklist["image_id"]]
    thumbs = make_thumbnails(out, target, [(i, paths[i]) for i in shown if isinstance(paths.get(i), str)])
    jobs = heat_jobs(run, heatmap_limit)
    classes = run.classes
    members = [m.label for m in run.cfg.train.members] if len(run.predictions) else []
    ran = make_heatmaps(
        out, target, jobs, classes, members, run.cfg.crop.scale_factor, run.cfg.crop.max_scale
    )
    heats = {
        (j.image_id, c)
        for j in jobs
        for c in j.classes
        if storage.exists(storage.join(target, heat_name(j.image_id, c)))
    }
    builder = PageBuilder(run, per_page, heats, set(paths_with_thumbs(paths, shown)))
    pages = builder.pages(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    _render(pages, target)
    return ReportResult(storage.join(target, INDEX), len(pages), thumbs, ran, time.perf_counter() - start)


def paths_with_thumbs(paths: dict[str, object], shown: list[str]) -> list[str]:
    """Images whose thumbnail exists: those with a normalized file (failed downloads have none)."""
    return [i for i in shown if isinstance(paths.get(i), str)]
