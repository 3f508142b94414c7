"""Food-101 layout: ``images/<class>/<id>.jpg`` listed by ``meta/train.txt`` and ``meta/test.txt``.

A meta line names a file under ``images/``; one that would lead elsewhere (``../../etc/x``, an absolute
path, a ``::`` chain, a NUL byte) is a candidate refused with ``unsupported_url``, never opened
(``pipeline.sources.locators``)."""

from __future__ import annotations

from collections.abc import Iterator

from pipeline import storage
from pipeline.reasons import Reason
from pipeline.sources import Candidate, SourceError, encode_locator
from pipeline.sources.locators import Refused, confined


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
            if not entry:
                continue
            try:
                entry = confined(entry)
            except Refused as exc:
                if entry not in seen:
                    seen.add(entry)
                    refused = Reason.UNSUPPORTED_URL
                    yield Candidate(name, f"images/{entry}.jpg", encode_locator(entry), None, split,
                                    reason=refused, detail=f"{exc}: not under images/")  # fmt: skip
                continue
            if entry in seen:
                continue
            seen.add(entry)
            label = entry.split("/", 1)[0] if "/" in entry else None
            key = f"images/{entry}.jpg"
            yield Candidate(name, key, encode_locator(storage.join(root, key)), label, split)
    if not found_any:
        raise SourceError(f"{root}: not a Food-101 layout (no meta/train.txt or meta/test.txt)")
