"""Stage ``split``: balance classes and assign train/val/test deterministically; writes the images manifest.

Splits the source declares are kept (Food-101's train/test; an ImageFolder's train/val/test folders).
When the source gives train and test only, a share of each class's train images moves to val. When it
gives none, each class is split by the configured fractions. Order within a class is a salted hash of
``image_id``, so the same inputs always give the same split.

Names are checked again here (``refuse_bad_names``): an ok row whose image id, label or split cannot name
a path under OUT (a manifest of an older version, a hand edit) leaves as ``bad_image_id``, ``bad_label``
or ``bad_split``, so that the images manifest this stage writes holds no such name.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import numpy as np
import pandas as pd

from pipeline import manifests
from pipeline.annotate.verdicts import apply_overrides, digest, read_overrides
from pipeline.config import RunConfig
from pipeline.names import id_problem, label_problem, split_problem
from pipeline.reasons import Reason, Status
from pipeline.stages.base import RunContext, Stage, StageResult
from pipeline.summary import ingest_summary


def hash_rank(image_ids: pd.Series, salt: str) -> pd.Series:
    """A deterministic pseudo-random number in [0, 1) per image."""
    return image_ids.map(
        lambda i: int(hashlib.sha256(f"{salt}\x00{i}".encode()).hexdigest()[:12], 16) / 16**12
    )


def _assign_by_fraction(idx: pd.Index, rank: pd.Series, fractions: list[tuple[str, float]]) -> pd.Series:
    """Stratified assignment within one class: the lowest ranks go to the first split, and so on."""
    ordered = rank.loc[idx].sort_values(kind="stable").index
    n = len(ordered)
    bounds = np.round(np.cumsum([f for _, f in fractions]) * n).astype(int)
    out = pd.Series(index=ordered, dtype=object)
    start = 0
    for (name, _), end in zip(fractions, bounds, strict=True):
        out.iloc[start:end] = name
        start = end
    out.iloc[start:] = fractions[-1][0]
    return out


_NAME_CHECKS = (
    ("image_id", id_problem, Reason.BAD_IMAGE_ID),
    ("label", label_problem, Reason.BAD_LABEL),
    ("split", split_problem, Reason.BAD_SPLIT),
)


def refuse_bad_names(images: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Ok rows whose image id, label or split cannot name a path under OUT leave the dataset with the
    reason (and the name in ``detail``); no row keeps such a label or split. New runs refuse these at the
    source; this catches a manifest written by an older version or edited by hand, and a relabel to a
    bad name in the verdicts. Returns the rows and how many left."""
    images = images.copy()
    left = 0
    for column, problem, reason in _NAME_CHECKS:
        values = images[column]
        # Checked once per distinct value: a manifest holds few labels and splits, many rows.
        found = {v: p for v in values.dropna().unique() if (p := problem(v))}
        if not found:
            continue
        bad = values.isin(list(found))
        refuse = bad & (images["status"] == Status.OK)
        images.loc[refuse, "detail"] = [f"{column} {v!r}: {found[v]}" for v in values[refuse]]
        images.loc[refuse, ["status", "reason", "split"]] = [Status.REJECTED.value, reason.value, None]
        if column != "image_id":  # the id names the row; a bad label or split is not kept anywhere
            images.loc[bad, column] = None
        left += int(refuse.sum())
    return images, left


class SplitStage(Stage):
    name = "split"
    config_sections: ClassVar[tuple[str, ...]] = ("split", "balance")
    # Annotators' verdicts that change the dataset; keeps change only the blacklist (the crop stage's).
    verdicts: ClassVar[tuple[str, ...]] = ("drop", "relabel")

    def config_key(self, cfg: RunConfig) -> str:
        key = super().config_key(cfg)
        applied = digest(read_overrides(cfg.out), self.verdicts)
        return key if applied is None else f"{key}+verdicts={applied}"

    def run(self, ctx: RunContext) -> StageResult:
        cfg, bal = ctx.cfg.split, ctx.cfg.balance
        images = manifests.read_manifest("images", ctx.layout.deduped_images)
        images, bad_names = refuse_bad_names(images)
        ok = images["status"] == Status.OK
        unlabeled = ok & images["label"].isna()
        images.loc[unlabeled, ["status", "reason", "detail"]] = [
            Status.REJECTED.value,
            Reason.UNLABELED.value,
            "no label",
        ]
        ok &= ~unlabeled
        rank = hash_rank(images["image_id"], cfg.salt)

        given = images["split"].where(ok)
        new_split = given.copy()
        for _, grp in images[ok].groupby("label"):
            has = grp["split"].notna()
            if has.all():
                train = grp.index[grp["split"].eq("train")]
                if cfg.val_from_train and not grp["split"].eq("val").any() and len(train) > 1:
                    val_frac = cfg.val_from_train
                    new_split.loc[train] = _assign_by_fraction(
                        train, rank, [("val", val_frac), ("train", 1 - val_frac)]
                    )
            else:  # the source gives no split for these: draw one
                fr = [("train", cfg.train), ("val", cfg.val), ("test", cfg.test)]
                new_split.loc[grp.index[~has]] = _assign_by_fraction(
                    grp.index[~has], rank, [f for f in fr if f[1] > 0]
                )
        images["split"] = new_split.where(ok)

        # Balance: classes below the minimum leave; train is capped per class (lowest ranks stay).
        counts = images[ok].groupby("label").size()
        small = counts[counts < bal.min_per_class].index
        drop_small = ok & images["label"].isin(small)
        images.loc[drop_small, ["status", "reason", "detail"]] = [
            Status.REJECTED.value,
            Reason.CLASS_TOO_SMALL.value,
            f"class has fewer than {bal.min_per_class} images",
        ]
        ok &= ~drop_small
        capped = 0
        if bal.max_per_class:
            train = images[ok & images["split"].eq("train")].assign(_rank=rank)
            over = train.sort_values("_rank").groupby("label").cumcount() >= bal.max_per_class
            over_idx = over[over].index
            images.loc[over_idx, ["status", "reason", "detail"]] = [
                Status.REJECTED.value,
                Reason.CLASS_CAP.value,
                f"over the cap of {bal.max_per_class} train images",
            ]
            capped = len(over_idx)
        images.loc[images["status"] != Status.OK, "split"] = None
        # Verdicts last, so that the split of every other image stays what it was without them.
        images, applied = apply_overrides(images, read_overrides(ctx.out))
        images, relabelled_bad = refuse_bad_names(images)  # a relabel to a name that cannot be a folder
        manifests.write_manifest("images", images, ctx.manifest("images"))
        final = images[images["status"] == Status.OK]
        stats = {
            "ok": len(final),
            "per_split": final["split"].value_counts().sort_index().to_dict(),
            "classes": int(final["label"].nunique()),
            "classes_dropped": len(small),
            "capped": capped,
            "verdicts": applied,
            "bad_names": bad_names + relabelled_bad,
        }
        # The ingest's summary (statuses, reasons, duplicate groups, classes per split) from its manifests.
        return StageResult(stats=stats, metrics={"ingest": ingest_summary(ctx.out)})
