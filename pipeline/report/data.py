"""What the report shows, read from a run's output: manifests, metrics.json, training histories, config."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipeline import manifests, storage
from pipeline.config import RunConfig, build_config, load_config_file
from pipeline.layout import RunLayout
from pipeline.names import id_problem, label_problem, split_problem
from pipeline.summary import read_metrics

log = logging.getLogger("cropclean")


@dataclass
class RunData:
    out: str
    cfg: RunConfig
    images: pd.DataFrame  # every candidate image
    duplicates: pd.DataFrame
    crops: pd.DataFrame  # the method's label-driven crops (one row per image), with the image's size
    searched: pd.DataFrame  # the method's label-free crops: the crop searched for the predicted class
    blacklist: pd.DataFrame  # sorted by score, highest first
    predictions: pd.DataFrame  # full-data models only
    metrics: dict[str, Any]
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # member -> epochs

    @property
    def classes(self) -> list[str]:
        ok = self.images[(self.images["status"] == "ok") & self.images["split"].notna()]
        return sorted(ok["label"].dropna().unique())


# Manifest columns whose values name files of the report (thumbs/<id>.jpg, heat/<id>/<label>.png).
_NAME_CHECKS = (
    ("image_id", id_problem),
    ("kept_id", id_problem),
    ("label", label_problem),
    ("suggested_label", label_problem),
    ("split", split_problem),
)


def _path_problem(out: str, path: str) -> bool:
    try:
        storage.join(out, path)
    except storage.UnsafePath:
        return True
    return False


def confined(out: str, name: str, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` without the rows whose image id, label or split cannot name a file under OUT, and with
    no ``path`` that leads out of OUT. cropclean writes no such row (names are checked where they enter
    and again by the split stage); a manifest edited by hand can hold one, and the report then leaves it
    out rather than name a file after it."""
    keep = pd.Series(True, index=frame.index)
    for column, problem in _NAME_CHECKS:
        if column in frame:
            values = frame[column]
            bad = [v for v in values.dropna().unique() if problem(v)]
            keep &= ~values.isin(bad)
    if not keep.all():
        log.warning("report: %d rows of %s left out: an image id, label or split that cannot name a file",
                    int((~keep).sum()), name)  # fmt: skip
    frame = frame[keep]
    if "path" in frame:
        bad_path = frame["path"].map(lambda p: isinstance(p, str) and _path_problem(out, p))
        if bad_path.any():
            log.warning(
                "report: %d paths of %s lead out of the run's folder; not read", int(bad_path.sum()), name
            )
            frame = frame.assign(path=frame["path"].where(~bad_path, None))
    return frame


def _manifest(out: str, name: str, columns: list[str] | None = None) -> pd.DataFrame:
    """A manifest, or an empty frame of its columns when the stage that writes it has not run; rows
    that would name a file outside OUT are left out (``confined``)."""
    uri = RunLayout(out).manifest(name)
    if storage.exists(uri):
        return confined(out, name, manifests.read_manifest(name, uri, columns=columns))
    return pd.DataFrame(columns=columns or manifests.load_schema(name).names)


def _histories(out: str, cfg: RunConfig) -> dict[str, list[dict[str, Any]]]:
    found = {}
    for member in cfg.train.members:
        uri = storage.join(RunLayout(out).model_dir(member.label), "history.json")
        if storage.exists(uri):
            found[member.label] = json.loads(storage.read_text(uri))["history"]
    return found


def read_run(out: str) -> RunData:
    """Everything the report needs from ``out``; a run that stopped after ingest gives empty crops."""
    run_yaml = RunLayout(out).run_config
    if not storage.exists(run_yaml):
        raise FileNotFoundError(f"{out} holds no run (no run.yaml); run cropclean ingest or clean first")
    cfg = build_config(load_config_file(run_yaml))
    images = _manifest(out, "images")
    method = cfg.crop.method
    crops = _manifest(out, "crops")
    crops = crops[crops["method"] == method]
    size = images[["image_id", "width", "height"]]
    label_driven = crops[crops["target"] == "label"].merge(size, on="image_id", how="left")
    label_free = crops[crops["target"] == "predicted"].merge(size, on="image_id", how="left")
    blacklist = _manifest(out, "blacklist").sort_values("score", ascending=False, kind="stable")
    blacklist = blacklist.merge(size, on="image_id", how="left").reset_index(drop=True)
    predictions = _manifest(out, "predictions")
    predictions = predictions[predictions["fold"].isna()]
    return RunData(
        out=out,
        cfg=cfg,
        images=images,
        duplicates=_manifest(out, "duplicates"),
        crops=label_driven.reset_index(drop=True),
        searched=label_free.reset_index(drop=True),
        blacklist=blacklist,
        predictions=predictions,
        metrics=read_metrics(out),
        histories=_histories(out, cfg),
    )
