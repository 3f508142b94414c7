"""The report's pages as view data: what each page shows, computed from ``RunData``; templates draw it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipeline.evaluation.classify import SELECTED
from pipeline.evaluation.quality import format_quality
from pipeline.report import svg
from pipeline.report.data import RunData
from pipeline.report.heatmaps import heat_name
from pipeline.report.thumbs import THUMB_SIDE, thumb_name

# Page file names: classes by index (a class name need not be a safe file name), 1-based page numbers.
INDEX = "index.html"


def gallery_page(class_index: int, page: int) -> str:
    return f"class-{class_index:03d}-p{page}.html"


def duplicates_page(page: int) -> str:
    return f"duplicates-p{page}.html"


def blacklist_page(page: int) -> str:
    return f"blacklist-p{page}.html"


NAV = {"galleries": gallery_page(0, 1), "duplicates": duplicates_page(1), "blacklist": blacklist_page(1)}


@dataclass
class Page:
    name: str  # file name under OUT/report/
    template: str
    context: dict[str, Any]


def pager(total: int, per_page: int, page: int, name: Callable[[int], str]) -> dict[str, Any]:
    pages = max(1, math.ceil(total / per_page))
    return {
        "number": page,
        "pages": pages,
        "total": total,
        "prev": name(page - 1) if page > 1 else None,
        "next": name(page + 1) if page < pages else None,
    }


def chunks(n: int, per_page: int) -> list[slice]:
    return [slice(s, s + per_page) for s in range(0, n, per_page)] or [slice(0, 0)]


def _pct(value: float) -> float:
    return round(100 * value, 2)


def box(
    row: Any, width: float, height: float, kind: str, title: str, prefix: str = ""
) -> dict[str, Any] | None:
    """A crop box as percentages of the picture (the crop's pixels are the normalized image's)."""
    x0, y0, x1, y1 = (getattr(row, f"{prefix}{c}") for c in ("x0", "y0", "x1", "y1"))
    if any(pd.isna(v) for v in (x0, y0, x1, y1)) or not width or not height:
        return None
    return {
        "left": _pct(x0 / width),
        "top": _pct(y0 / height),
        "width": _pct((x1 - x0) / width),
        "height": _pct((y1 - y0) / height),
        "kind": kind,
        "title": title,
    }


def picture(
    image_id: str,
    width: Any,
    height: Any,
    alt: str,
    boxes: Sequence[dict[str, Any] | None] = (),
    heat: str | None = None,
    heat_class: str = "",
    heat_shown: bool = False,
    thumb: bool = True,
) -> dict[str, Any]:
    w = int(width) if not pd.isna(width) else THUMB_SIDE
    h = int(height) if not pd.isna(height) else THUMB_SIDE
    scale = THUMB_SIDE / max(w, h)
    return {
        "thumb": thumb_name(image_id) if thumb else None,
        "width": w,
        "height": h,
        "tw": round(w * scale),
        "th": round(h * scale),
        "alt": alt,
        "boxes": [b for b in boxes if b],
        "heat": heat,
        "heat_class": heat_class,
        "heat_shown": heat_shown,
    }


class PageBuilder:
    """Builds every page of one report; ``heats``: the (image_id, class) overlays that exist; ``thumbs``:
    the images that have a thumbnail."""

    def __init__(self, run: RunData, per_page: int, heats: set[tuple[str, str]], thumbs: set[str]) -> None:
        self.run, self.per_page, self.heats, self.thumbs = run, per_page, heats, thumbs
        self.classes = run.classes
        self.flagged = set(run.blacklist["image_id"])
        self.common = {"nav": NAV, "run_name": run.out.rstrip("/").rsplit("/", 1)[-1]}

    def _heat(self, image_id: str, cls: Any) -> str | None:
        return heat_name(image_id, cls) if (image_id, cls) in self.heats else None

    def pages(self, built: str) -> list[Page]:
        return [self.index(built), *self.galleries(), *self.duplicates(), *self.blacklist()]

    # ----------------------------------------------------------------------------------------- index

    def index(self, built: str) -> Page:
        run, images = self.run, self.run.images
        ok = images[images["status"] == "ok"]
        in_dataset = ok[ok["split"].notna()]
        dups = run.duplicates
        removed = int((dups["image_id"] != dups["kept_id"]).sum()) if len(dups) else 0
        counts = [
            ("inputs", len(images)),
            ("ok", len(ok)),
            ("rejected", int((images["status"] == "rejected").sum())),
            ("failed", int((images["status"] == "failed").sum())),
            ("duplicates removed", removed),
            ("in the dataset", len(in_dataset)),
            ("cropped", int(run.crops["path"].notna().sum())),
            ("blacklisted", len(run.blacklist)),
        ]
        bad = images[images["status"] != "ok"]
        reasons = bad.groupby(["status", "reason"], dropna=False).size().reset_index(name="n")
        groups = (
            dups.groupby("group_id").agg(
                cross_label=("cross_label", "first"), cross_split=("cross_split", "first")
            )
            if len(dups)
            else pd.DataFrame()
        )
        splits = [s for s in ("train", "val", "test") if (in_dataset["split"] == s).any()]
        per_class = in_dataset.groupby(["label", "split"]).size()
        crops_per_class = run.crops.groupby("label").size()
        cropped = run.crops[run.crops["path"].notna()].groupby("label").size()
        flagged = run.blacklist.groupby("label").size()
        classes = [
            {
                "name": c,
                "splits": [int(per_class.get((c, s), 0)) for s in splits],
                "crops": int(crops_per_class.get(c, 0)),
                "cropped": int(cropped.get(c, 0)),
                "blacklisted": int(flagged.get(c, 0)),
                "href": gallery_page(i, 1),
            }
            for i, c in enumerate(self.classes)
        ]
        context = {
            **self.common,
            "title": "Run summary",
            "page_kind": "index",
            "out": run.out,
            "built": built,
            "counts": [{"what": w, "n": n} for w, n in counts],
            "reasons": [
                {"status": r.status, "reason": r.reason, "n": int(r.n)} for r in reasons.itertuples()
            ],
            "dup": {
                "groups": len(groups),
                "images": len(dups),
                "removed": removed,
                "cross_label": int(groups["cross_label"].sum()) if len(groups) else 0,
                "cross_split": int(groups["cross_split"].sum()) if len(groups) else 0,
            },
            "blacklist_reasons": [
                {"reason": r, "n": int(n)} for r, n in run.blacklist["reason"].value_counts().items()
            ],
            "splits": splits,
            "classes": classes,
            "training": self.training_charts(),
            "table4": self.table4(),
            "quality": format_quality(run.metrics.get("evaluation", {}).get("quality") or {}),
            "review": self.review(),
        }
        return Page(INDEX, "index.html", context)

    def review(self) -> dict[str, Any] | None:
        """The blacklist's human-confirmed precision (metrics.json ``review``, written by ``cropclean
        verdicts import``): overall, per reason, per score band, and the threshold for the target."""
        r = self.run.metrics.get("review") or {}
        if not r.get("reviewed"):
            return None

        def row(name: str, c: dict[str, Any]) -> dict[str, Any]:
            lo, hi = c.get("interval95") or (None, None)
            return {"name": name, "reviewed": c["reviewed"], "confirmed": c["confirmed"],
                    "precision": f"{c['precision']:.2f}",
                    "interval": f"{lo:.2f} to {hi:.2f}" if lo is not None else ""}  # fmt: skip

        t = r.get("threshold")
        threshold = {**t, "score": f"{t['score']:.3f}", "precision": f"{t['precision']:.2f}"} if t else None
        return {
            "overall": row("all reviewed flags", r),
            "reasons": [row(reason, c) for reason, c in sorted(r.get("per_reason", {}).items())],
            "bands": [row(f"score {b['low']:.1f} to {b['high']:.1f}", b) for b in r.get("per_band", [])],
            "target": f"{r.get('target_precision', 0):g}",
            "threshold": threshold,
            "verdicts": r.get("verdicts", {}),
            "unflagged": r.get("unflagged_verdicts", 0),
        }

    def training_charts(self) -> list[str]:
        h = self.run.histories
        if not h:
            return []
        top1 = {
            f"{m} {k}": [(r["epoch"] + 1, r[f"{k}_top1"]) for r in rows]
            for m, rows in h.items()
            for k in ("train", "val")
        }
        loss = {
            f"{m} {k}": [(r["epoch"] + 1, r[f"{k}_loss"]) for r in rows]
            for m, rows in h.items()
            for k in ("train", "val")
        }
        return [
            svg.line_chart(top1, "top-1 accuracy per epoch", "top-1", y_range=(0.0, 1.0)),
            svg.line_chart(loss, "loss per epoch", "cross-entropy"),
        ]

    def table4(self) -> dict[str, Any] | None:
        ev = self.run.metrics.get("evaluation", {})
        if "top1_original" not in ev:
            return None
        method = ev.get("method", "method")
        groups: dict[str, dict[str, float]] = {method: {"original": ev["top1_original"]}}
        groups[method]["label-free crops"] = ev["top1_cropped_label_free"]
        groups[method]["label-driven crops"] = ev["top1_cropped_label_driven"]
        if ev.get("top1_cropped_retrained") is not None:
            groups[method]["retrained on the cleaned set"] = ev["top1_cropped_retrained"]
        for base, s in sorted(ev.get("baselines", {}).items()):
            groups[base] = {"original": ev["top1_original"]}
            if "top1_label_free" in s:
                groups[base]["label-free crops"] = s["top1_label_free"]
            if "top1_label_driven" in s:
                groups[base]["label-driven crops"] = s["top1_label_driven"]
        size = f", {ev['input_size']} px" if ev.get("input_size") else ""
        caption = (
            f"{ev.get('outside_arch', '?')} outside the ensemble{size}, trained on the train split"
            f"{SELECTED.get(ev.get('select_by'), '')}, scored on {ev.get('test_images', '?')} test images."
        )
        rows = [
            {
                "name": f"{base}, {what}",
                "top1": f"{100 * s[f'top1_{k}']:.1f}%",
                "top5": f"{100 * s[f'top5_{k}']:.1f}%" if s.get(f"top5_{k}") is not None else "",
            }
            for base, s, what, k in self._table4_rows(ev)
            if s.get(f"top1_{k}") is not None
        ]
        chart = svg.bar_chart(groups, "top-1 on the test images, before and after cropping")
        return {"caption": caption, "svg": chart, "rows": rows}

    @staticmethod
    def _table4_rows(ev: dict[str, Any]) -> list[tuple[str, dict[str, Any], str, str]]:
        """(localizer, numbers, words, key) per row, keys as in metrics.json's evaluation section."""
        method = ev.get("method", "method")
        rows = [
            ("no crop", ev, "original images", "original"),
            (method, ev, "label-free crops", "cropped_label_free"),
            (method, ev, "label-driven crops", "cropped_label_driven"),
            (method, ev, "label-free crops, retrained on the cleaned set", "cropped_retrained"),
        ]
        for base, s in sorted(ev.get("baselines", {}).items()):
            rows += [
                (base, s, "label-free crops", "label_free"),
                (base, s, "label-driven crops", "label_driven"),
            ]
        return rows

    # ------------------------------------------------------------------------------------- galleries

    def galleries(self) -> list[Page]:
        run, pages = self.run, []
        by_class = {c: g for c, g in run.crops.groupby("label")}
        links = [
            {"name": c, "n": len(by_class.get(c, ())), "href": gallery_page(i, 1)}
            for i, c in enumerate(self.classes)
        ]
        for i, cls in enumerate(self.classes):
            rows = by_class.get(cls, run.crops.iloc[:0]).sort_values(["split", "image_id"])
            name = lambda p, i=i: gallery_page(i, p)  # noqa: E731
            for n, part in enumerate(chunks(len(rows), self.per_page), start=1):
                cards = [self._gallery_card(r) for r in rows.iloc[part].itertuples()]
                context = {
                    **self.common,
                    "title": f"Class {cls}: crops",
                    "page_kind": "gallery",
                    "cards": cards,
                    "classlinks": [{**c, "current": c["name"] == cls} for c in links],
                    "pager_info": pager(len(rows), self.per_page, n, name),
                    "method": run.cfg.crop.method,
                    "mode": run.cfg.crop.mode,
                    "has_heat": any(c["pic"]["heat"] for c in cards),
                }
                pages.append(Page(name(n), "gallery.html", context))
        if not self.classes:
            context = {
                **self.common,
                "title": "Galleries",
                "page_kind": "gallery",
                "cards": [],
                "classlinks": [],
                "pager_info": pager(0, self.per_page, 1, lambda p: gallery_page(0, p)),
                "method": run.cfg.crop.method,
                "mode": run.cfg.crop.mode,
                "has_heat": False,
            }
            pages.append(Page(gallery_page(0, 1), "gallery.html", context))
        return pages

    def _gallery_card(self, r: Any) -> dict[str, Any]:
        crop = box(
            r, r.width, r.height, "crop", f"crop, score {r.score:.2f}" if not pd.isna(r.score) else "crop"
        )
        caption = r.reason if pd.isna(r.x0) else f"{int(r.x1 - r.x0)}x{int(r.y1 - r.y0)} px"
        if not pd.isna(r.score):
            caption += f" · p {r.score:.2f}"
        return {
            "image_id": r.image_id,
            "split": r.split,
            "caption": caption,
            "flagged": r.image_id in self.flagged,
            "pic": picture(
                r.image_id,
                r.width,
                r.height,
                f"{r.label} {r.image_id}",
                [crop],
                self._heat(r.image_id, r.label),
                r.label,
            ),
        }

    # ------------------------------------------------------------------------------------ duplicates

    def duplicates(self) -> list[Page]:
        dups = self.run.duplicates
        info = self.run.images.set_index("image_id")[["label", "split", "width", "height"]]
        groups = []
        for gid, g in dups.groupby("group_id", sort=True):
            g = g.assign(kept=g["image_id"] == g["kept_id"]).sort_values(
                ["kept", "image_id"], ascending=[False, True]
            )
            members = []
            for r in g.itertuples():
                meta = info.loc[r.image_id] if r.image_id in info.index else None
                width = meta["width"] if meta is not None else None
                height = meta["height"] if meta is not None else None
                label = meta["label"] if meta is not None else ""
                # Why it is grouped with the kept image (duplicates 1.1; absent from older manifests).
                score, by = getattr(r, "verify_score", None), getattr(r, "verified_by", None)
                members.append(
                    {
                        "image_id": r.image_id,
                        "kept": bool(r.kept),
                        "kind": r.kind,
                        "distance": int(r.distance),
                        "verify_score": None if score is None or pd.isna(score) else f"{float(score):.2f}",
                        "verified_by": by if isinstance(by, str) else None,
                        "label": label,
                        "split": meta["split"] if meta is not None else "",
                        "pic": picture(
                            r.image_id,
                            width,
                            height,
                            f"{label} {r.image_id}",
                            thumb=r.image_id in self.thumbs,
                        ),
                    }
                )
            groups.append(
                {
                    "group_id": gid,
                    "members": members,
                    "cross_label": bool(g["cross_label"].iloc[0]),
                    "cross_split": bool(g["cross_split"].iloc[0]),
                }
            )
        # Label conflicts first: they are the ones a person must look at.
        groups.sort(key=lambda g: (not g["cross_label"], not g["cross_split"], g["group_id"]))
        pages = []
        for n, part in enumerate(chunks(len(groups), self.per_page // 4 or 1), start=1):
            context = {
                **self.common,
                "title": "Duplicate groups",
                "page_kind": "duplicates",
                "groups": groups[part],
                "pager_info": pager(len(groups), self.per_page // 4 or 1, n, duplicates_page),
            }
            pages.append(Page(duplicates_page(n), "duplicates.html", context))
        return pages

    # ------------------------------------------------------------------------------------- blacklist

    def blacklist(self) -> list[Page]:
        bl = self.run.blacklist
        searched = self.run.crops.set_index("image_id")
        pages = []
        for n, part in enumerate(chunks(len(bl), self.per_page), start=1):
            rows = [
                self._review_row(r, start, searched)
                for start, r in enumerate(bl.iloc[part].itertuples(), start=part.start + 1)
            ]
            context = {
                **self.common,
                "title": "Blacklist review",
                "page_kind": "blacklist",
                "rows": rows,
                "pager_info": pager(len(bl), self.per_page, n, blacklist_page),
            }
            pages.append(Page(blacklist_page(n), "blacklist.html", context))
        return pages

    def _review_row(self, r: Any, rank: int, searched: pd.DataFrame) -> dict[str, Any]:
        crop_box = None
        if r.image_id in searched.index:
            c = searched.loc[r.image_id]
            crop_box = (
                box(c, r.width, r.height, "crop", f"crop searched for {r.label}") if c is not None else None
            )
        alt = f"{r.label} {r.image_id}"
        suggested = r.suggested_label if not pd.isna(r.suggested_label) else None

        def heat_pic(cls: str | None) -> dict[str, Any] | None:
            heat = self._heat(r.image_id, cls) if cls else None
            return picture(r.image_id, r.width, r.height, alt, (), heat, cls or "", True) if heat else None

        def fmt(v: Any, spec: str) -> str:
            return "" if pd.isna(v) else format(v, spec)

        return {
            "rank": rank,
            "image_id": r.image_id,
            "split": r.split or "",
            "label": r.label,
            "suggested": suggested or "none",
            "score": fmt(r.score, ".3f"),
            "suggested_score": fmt(r.suggested_score, ".2f"),
            "votes": fmt(r.votes, "d"),
            "suggested_votes": fmt(r.suggested_votes, "d"),
            "reason": r.reason,
            "evidence": r.evidence if not pd.isna(r.evidence) else "",
            "pic": picture(r.image_id, r.width, r.height, alt, [crop_box]),
            "given_pic": heat_pic(r.label),
            "suggested_pic": heat_pic(suggested),
        }
