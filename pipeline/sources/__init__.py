"""Sources turn a dataset location into candidate rows: one per input file or URL.

A candidate is ``{source, source_key, locator, label, split, url, reason, detail}``: ``source_key`` is the
path relative to the source root (or the URL), ``locator`` is the URI the bytes are read from (kept as
UTF-8 bytes with surrogate escapes, so that file names that are not valid UTF-8 still round-trip),
``split`` is the split the source itself declares (or None). A candidate with a ``reason`` was refused
where it entered (a locator the guard does not allow, a label that cannot name a folder): the normalize
stage writes its row as ``rejected`` without opening anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pipeline import storage
from pipeline.config import SourceConfig


class SourceError(ValueError):
    """A source is missing or malformed."""


@dataclass(frozen=True)
class Candidate:
    source: str
    source_key: str
    locator: bytes
    label: str | None
    split: str | None
    url: str | None = None
    page_url: str | None = None
    query: str | None = None
    engine: str | None = None
    rank: int | None = None
    license: str | None = None
    reason: str | None = None  # refused at the source: a Reason code; nothing is read for it
    detail: str | None = None


def encode_locator(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def decode_locator(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def display_key(key: str) -> str:
    """A key safe to store as Parquet text: undecodable bytes become backslash escapes."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def detect_kind(uri: str) -> str:
    """Guess a source's kind from what is at ``uri``."""
    if storage.exists(storage.join(uri, "meta", "train.txt")):
        return "food101"
    lowered = uri.lower()
    if lowered.endswith((".csv", ".txt", ".parquet", ".tsv")):
        return "urllist"
    return "imagefolder"


def iter_candidates(cfg: SourceConfig, cache_dir: str | None = None) -> Iterator[Candidate]:
    """Candidates of one source; ``cache_dir`` keeps search responses so that re-runs spend no quota."""
    from pipeline.sources import food101, imagefolder, search, urllist

    if cfg.kind == "search":
        yield from search.read(cfg, cfg.label, cache_dir or "memory://cropclean-search-cache")
        return
    assert cfg.uri is not None
    kind = cfg.kind if cfg.kind != "auto" else detect_kind(cfg.uri)
    name = cfg.name or kind
    readers = {"food101": food101.read, "imagefolder": imagefolder.read, "urllist": urllist.read}
    yield from readers[kind](cfg.uri, name)
