"""Names that come from strangers and become path segments under OUT: class labels and splits.

A label names a folder (``cropped/<split>/<label>/``, the report's heatmaps), so it must be one path
segment: not empty, not ``.`` or ``..``, no ``/`` or ``\\``, no control characters, valid UTF-8, at most
``MAX_LABEL_BYTES`` bytes. A label that breaks a rule is refused where it enters (the candidate becomes a
``rejected`` row with reason ``bad_label``); the manifests never hold one, and path builders check again.
Splits are ``train``, ``val`` or ``test``.
"""

from __future__ import annotations

import unicodedata

SPLITS: tuple[str, ...] = ("train", "val", "test")
MAX_LABEL_BYTES = 200


class UnsafeName(ValueError):
    """A name that cannot be used as a path segment under OUT."""


def label_problem(label: str) -> str | None:
    """Why ``label`` cannot name a class folder, or None when it can."""
    if not isinstance(label, str):
        return f"not text ({type(label).__name__})"
    if not label.strip():
        return "empty"
    if label in (".", ".."):
        return f"{label!r} names a folder of its own"
    if "/" in label or "\\" in label:
        return "contains a path separator"
    if any(unicodedata.category(ch) == "Cc" for ch in label):
        return "contains control characters"
    try:
        size = len(label.encode("utf-8"))
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if size > MAX_LABEL_BYTES:
        return f"longer than {MAX_LABEL_BYTES} bytes ({size})"
    return None


def split_problem(split: str) -> str | None:
    """Why ``split`` is not a split name, or None when it is one."""
    if split not in SPLITS:
        return f"not one of {', '.join(SPLITS)}"
    return None


def safe_label(label: str) -> str:
    """``label`` itself, or UnsafeName when it cannot be a folder name."""
    problem = label_problem(label)
    if problem:
        raise UnsafeName(f"label {label!r}: {problem}")
    return label


def safe_split(split: str) -> str:
    problem = split_problem(split)
    if problem:
        raise UnsafeName(f"split {split!r}: {problem}")
    return split
