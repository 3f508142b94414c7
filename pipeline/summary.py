"""Run summaries: counts computed from the manifests, saved in metrics.json and printed as tables."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from pipeline import manifests, storage
from pipeline.layout import RunLayout


def ingest_summary(out: str) -> dict[str, Any]:
    """Statuses, reasons, duplicate groups and classes per split, from the images and duplicates
    manifests (no duplicates manifest: no groups)."""
    layout = RunLayout(out)
    images = manifests.read_manifest("images", layout.manifest("images"))
    dups_uri = layout.manifest("duplicates")
    if storage.exists(dups_uri):
        dups = manifests.read_manifest("duplicates", dups_uri)
    else:
        dups = pd.DataFrame(columns=manifests.load_schema("duplicates").names).astype(
            {"cross_label": bool, "cross_split": bool}
        )
    ok = images[images["status"] == "ok"]
    reasons = images[images["status"] != "ok"].groupby(["status", "reason"]).size()
    per_class = ok.groupby(["label", "split"]).size().unstack(fill_value=0)
    groups = dups.groupby("group_id").agg(
        size=("image_id", "size"), cross_label=("cross_label", "first"), cross_split=("cross_split", "first")
    )
    return {
        "images": len(images),
        "status": images["status"].value_counts().sort_index().to_dict(),
        "reasons": {f"{s}/{r}": int(n) for (s, r), n in reasons.items()},
        "duplicates": {
            "groups": len(groups),
            "images_in_groups": len(dups),
            "removed": int((dups["image_id"] != dups["kept_id"]).sum()),
            "cross_label_groups": int(groups["cross_label"].sum()),
            "cross_split_groups": int(groups["cross_split"].sum()),
        },
        "splits": ok["split"].value_counts().sort_index().to_dict(),
        "per_class": {str(c): {str(k): int(v) for k, v in row.items()} for c, row in per_class.iterrows()},
    }


def read_metrics(out: str) -> dict[str, Any]:
    """OUT/metrics.json, or nothing yet."""
    uri = RunLayout(out).metrics
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else {}


def update_metrics(out: str, section: str, values: dict[str, Any]) -> None:
    """Merge one section into OUT/metrics.json (written atomically)."""
    uri = RunLayout(out).metrics
    metrics = read_metrics(out)
    metrics[section] = values
    storage.write_text_atomic(uri, json.dumps(metrics, indent=2, sort_keys=True, default=str))


def _table(rows: list[tuple[Any, ...]], headers: tuple[str, ...]) -> str:
    df = pd.DataFrame(rows, columns=list(headers))
    return df.to_string(index=False) if len(df) else "  (none)"


def format_ingest_summary(s: dict[str, Any], out: str) -> str:
    lines = [f"Ingest summary: {s['images']} inputs"]
    lines.append(_table([(k, v) for k, v in s["status"].items()], ("status", "images")))
    lines.append("")
    lines.append(
        _table(
            [(*k.split("/"), v) for k, v in sorted(s["reasons"].items())],
            ("status", "reason", "images"),
        )
    )
    d = s["duplicates"]
    lines.append("")
    lines.append(
        f"Duplicate groups: {d['groups']} ({d['images_in_groups']} images, {d['removed']} removed); "
        f"label conflicts (across labels): {d['cross_label_groups']}; across train/test: "
        f"{d['cross_split_groups']}"
    )
    lines.append("")
    splits = sorted({k for row in s["per_class"].values() for k in row})
    rows = [(c, *[row.get(sp, 0) for sp in splits]) for c, row in sorted(s["per_class"].items())]
    lines.append(_table(rows, ("class", *splits)))
    lines.append("")
    lines.append(f"Manifests: {storage.join(out, 'manifests')}/  (images.parquet, duplicates.parquet)")
    return "\n".join(lines)
