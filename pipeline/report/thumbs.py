"""Thumbnails: small JPEGs of the normalized images, so that a gallery page loads a few KB per image."""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from pipeline import progress, storage
from pipeline.names import safe_id

THUMB_SIDE = 160  # longest side, pixels
THUMB_QUALITY = 80


def thumb_name(image_id: str) -> str:
    """A thumbnail's path relative to the report folder; an id that cannot name a file (a manifest
    edited by hand) raises UnsafeName."""
    return f"thumbs/{safe_id(image_id)}.jpg"


def _make(out: str, report_dir: str, image_id: str, path: str) -> bool:
    target = storage.join(report_dir, thumb_name(image_id))
    if storage.exists(target):  # ids are content-derived: an existing thumbnail is the same picture
        return False
    with Image.open(io.BytesIO(storage.read_bytes(storage.join(out, path)))) as im:
        im = im.convert("RGB")
        im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=THUMB_QUALITY, optimize=True)
    storage.write_bytes_atomic(target, buf.getvalue())
    return True


def make_thumbnails(out: str, report_dir: str, rows: Sequence[tuple[str, str]], threads: int = 4) -> int:
    """Thumbnails of ``(image_id, path)`` rows (path relative to ``out``); returns how many were new.

    Decoding and encoding release the GIL, so a few threads keep up with the disk.
    """
    unique = list(dict(rows).items())
    with ThreadPoolExecutor(max_workers=threads) as pool:
        made = pool.map(lambda r: _make(out, report_dir, *r), unique)
        return sum(progress.bar(made, len(unique), "report: thumbnails"))
