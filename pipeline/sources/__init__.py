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


LIST_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet")
_FOLDER_KINDS = ("food101", "imagefolder")


def detect_kind(uri: str) -> str:
    """Guess a source's kind from what is at ``uri``: a folder with ``meta/train.txt`` is Food-101, a
    file named like a list (or a missing path so named) a URL list, anything else an ImageFolder."""
    if storage.exists(storage.join(uri, "meta", "train.txt")):
        return "food101"
    if uri.lower().endswith(LIST_SUFFIXES) and not _is_folder(uri):
        return "urllist"
    return "imagefolder"


def _is_folder(uri: str) -> bool:
    fs, path = storage.get_fs(uri)
    return bool(fs.isdir(path))


def _fits(kind: str) -> str:
    return f"kind {kind} fits it (--kind {kind}, or leave --kind out)"


def check_source(uri: str, kind: str = "auto") -> str:
    """The kind to read ``uri`` as (``kind``, or the detected one for ``auto``), after checking that
    something of that kind is there. SourceError says in one line what was found at ``uri`` and which
    kind fits it; a folder the process may not list raises PermissionError. Cheap: a stat, a listing of
    the top folder and the Food-101 meta files, so that the command line can check before any work."""
    fs, path = storage.get_fs(uri)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise SourceError(f"{uri}: no such file or folder") from None
    found = detect_kind(uri)
    if info.get("type") == "directory":
        if kind == "urllist":
            raise SourceError(f"{uri}: a folder (it looks like {found}), but kind urllist reads a list "
                              f"file (.csv, .tsv, .txt or .parquet); {_fits(found)}")  # fmt: skip
        if kind == "food101" and not any(
            storage.exists(storage.join(uri, "meta", f"{s}.txt")) for s in ("train", "test")
        ):
            raise SourceError(f"{uri}: not a Food-101 layout (no meta/train.txt or meta/test.txt); "
                              f"it looks like an imagefolder: {_fits(found)}")  # fmt: skip
        if not fs.ls(path, detail=False):  # raises PermissionError where the folder cannot be listed
            raise SourceError(f"{uri}: an empty folder, no images to read")
        return found if kind == "auto" else kind
    if found == "urllist":
        if kind in _FOLDER_KINDS:
            raise SourceError(f"{uri}: a file that looks like a URL list, but kind {kind} reads a folder; "
                              f"{_fits('urllist')}")  # fmt: skip
        return "urllist"
    if kind in _FOLDER_KINDS:
        raise SourceError(f"{uri}: a file, but kind {kind} reads a folder of images; give the folder")
    if kind == "auto":
        raise SourceError(f"{uri}: a file, neither a folder of images nor a URL list (.csv, .tsv, .txt or "
                          ".parquet); give the folder, or --kind urllist if it is a list")  # fmt: skip
    return "urllist"


def _what_none_means(kind: str) -> str:
    return {
        "food101": "its meta files list no images",
        "imagefolder": "no image files (.jpg, .png, ...) in it",
        "urllist": "the list has no entries",
    }[kind]


def iter_candidates(cfg: SourceConfig, cache_dir: str | None = None) -> Iterator[Candidate]:
    """Candidates of one source; ``cache_dir`` keeps search responses so that re-runs spend no quota.

    SourceError when the source is missing, is not of its kind, or gives no candidates at all."""
    from pipeline.sources import food101, imagefolder, search, urllist

    if cfg.kind == "search":
        yield from search.read(cfg, cfg.label, cache_dir or "memory://cropclean-search-cache")
        return
    assert cfg.uri is not None
    kind = check_source(cfg.uri, cfg.kind)
    name = cfg.name or kind
    readers = {"food101": food101.read, "imagefolder": imagefolder.read, "urllist": urllist.read}
    count = 0
    for count, candidate in enumerate(readers[kind](cfg.uri, name), start=1):  # noqa: B007
        yield candidate
    if count == 0:  # a run on nothing would only fail later, further from the cause
        raise SourceError(f"{cfg.uri}: read as {kind}, {_what_none_means(kind)}")
