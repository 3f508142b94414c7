"""ImageFolder layout: ``<class>/<file>``, optionally under ``train/``, ``val/`` and ``test/``; a folder of
files without class folders gives unlabelled candidates.

Paths come from listing the folder, so they stay inside it. One exception: fsspec cuts a path at ``::``
(a protocol chain) and would open another file, so a name with ``::`` is a candidate refused with
``unsupported_url``, never opened."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

from pipeline import storage
from pipeline.reasons import Reason
from pipeline.sources import Candidate, SourceError, display_key, encode_locator

SPLIT_DIRS = ("train", "val", "test")
# Files considered images by name. Content decides later: a file named .jpg that holds HTML is still a row.
IMAGE_SUFFIXES = (
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".gif",
    ".bmp",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".svg",
    ".ico",
)


def _is_candidate(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _dirs(fs, path: str) -> list[str]:
    return sorted(e["name"] for e in fs.ls(path, detail=True) if e.get("type") == "directory")


def _candidate(root: str, rel: str, name: str, label: str | None, split: str | None) -> Candidate:
    key = display_key(rel)
    if "::" in rel:
        return Candidate(name, key, encode_locator(rel), label, split, reason=Reason.UNSUPPORTED_URL,
                         detail="a file name with '::', which fsspec reads as a protocol chain")  # fmt: skip
    return Candidate(name, key, encode_locator(storage.join(root, rel)), label, split)


def read(root: str, name: str) -> Iterator[Candidate]:
    fs, base = storage.get_fs(root)
    if not fs.isdir(base):
        raise SourceError(f"{root}: no such folder")
    top = {posixpath.basename(d): d for d in _dirs(fs, base)}
    split_dirs = [(s, top[s]) for s in SPLIT_DIRS if s in top]
    layout = split_dirs if split_dirs else [(None, base)]
    if not top:  # no class folders: a flat folder of unlabelled images (for cropclean predict)
        for path in sorted(fs.find(base, maxdepth=1)):
            if _is_candidate(path):
                yield _candidate(root, posixpath.relpath(path, base), name, None, None)
        return
    for split, split_path in layout:
        for class_dir in _dirs(fs, split_path):
            label = posixpath.basename(class_dir)
            for path in sorted(fs.find(class_dir)):
                if not _is_candidate(path):
                    continue
                yield _candidate(root, posixpath.relpath(path, base), name, label, split)
