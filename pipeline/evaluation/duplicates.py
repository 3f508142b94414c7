"""Duplicate detection against ground truth: generated data (``pipeline/synth.py``) records which files
are copies of which original; these score the pairs a run's dedupe found against those true pairs."""

from __future__ import annotations

from itertools import combinations

import pandas as pd


def pairs_from_groups(groups: dict[str, list[str]]) -> set[tuple[str, str]]:
    pairs: set[tuple[str, str]] = set()
    for members in groups.values():
        pairs.update(tuple(sorted(p)) for p in combinations(sorted(set(members)), 2))
    return pairs


def true_duplicate_pairs(gt: pd.DataFrame) -> set[tuple[str, str]]:
    """Pairs of source keys that are copies of one original (transitively), among decodable files."""
    usable = gt[gt["expected_status"] == "ok"]
    copies = usable[usable["duplicate_of"].notna()]
    groups: dict[str, list[str]] = {}
    for key, orig in zip(copies["source_key"], copies["duplicate_of"], strict=True):
        groups.setdefault(orig, [orig]).append(key)
    return pairs_from_groups(groups)


def found_duplicate_pairs(images: pd.DataFrame, dups: pd.DataFrame) -> set[tuple[str, str]]:
    key_of = images.set_index("image_id")["source_key"]
    groups = dups.assign(key=dups["image_id"].map(key_of)).groupby("group_id")["key"].apply(list).to_dict()
    return pairs_from_groups(groups)


def duplicate_pair_scores(images: pd.DataFrame, dups: pd.DataFrame, gt: pd.DataFrame) -> dict[str, float]:
    truth, found = true_duplicate_pairs(gt), found_duplicate_pairs(images, dups)
    hit = len(truth & found)
    return {
        "true_pairs": len(truth),
        "found_pairs": len(found),
        "precision": hit / len(found) if found else 1.0,
        "recall": hit / len(truth) if truth else 1.0,
    }
