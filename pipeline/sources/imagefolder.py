"""ImageFolder layout: ``<class>/<file>``, optionally under ``train/``, ``val/`` and ``test/``; a folder of
files without class folders gives unlabelled candidates."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

from pipeline import storage
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
                rel = posixpath.relpath(path, base)
                yield Candidate(name, display_key(rel), encode_locator(storage.join(root, rel)), None, None)
        return
    for split, split_path in layout:
        for class_dir in _dirs(fs, split_path):
            label = posixpath.basename(class_dir)
            for path in sorted(fs.find(class_dir)):
                if not _is_candidate(path):
                    continue
                rel = posixpath.relpath(path, base)
                yield Candidate(name, display_key(rel), encode_locator(storage.join(root, rel)), label, split)
