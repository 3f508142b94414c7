"""Food-101 layout: ``images/<class>/<id>.jpg`` listed by ``meta/train.txt`` and ``meta/test.txt``."""

from __future__ import annotations

from collections.abc import Iterator

from pipeline import storage
from pipeline.sources import Candidate, SourceError, encode_locator


def read(root: str, name: str) -> Iterator[Candidate]:
    root = root.rstrip("/")
    seen: set[str] = set()
    found_any = False
    for split in ("train", "test"):
        meta = storage.join(root, "meta", f"{split}.txt")
        if not storage.exists(meta):
            continue
        found_any = True
        for line in storage.read_text(meta).splitlines():
            entry = line.strip()
            if not entry or entry in seen:
                continue
            seen.add(entry)
            label = entry.split("/", 1)[0] if "/" in entry else None
            key = f"images/{entry}.jpg"
            yield Candidate(name, key, encode_locator(storage.join(root, key)), label, split)
    if not found_any:
        raise SourceError(f"{root}: not a Food-101 layout (no meta/train.txt or meta/test.txt)")
