"""Which locators may be opened: the rule every source follows and the normalize stage checks again.

A locator is what the normalize stage reads an input from. Two kinds exist:

- an ``http://`` or ``https://`` URL: downloaded by the guarded fetcher (``pipeline.crawl.fetch``) only,
  never handed to fsspec, so the network guard sees every request;
- a path inside a source's root: the folder of a Food-101 or ImageFolder source, or the folder a URL
  list lives in. A list's relative entries resolve under that folder with the list's own protocol (a
  list at ``s3://bucket/lists/urls.csv`` naming ``img/a.jpg`` reads ``s3://bucket/lists/img/a.jpg``);
  ``a/../b.jpg`` is fine, since it stays inside.

Anything else in a URL list or a Food-101 meta file is refused where it is read, as a candidate with
``reason=unsupported_url`` and a detail, and never opened: fsspec protocol chains (``simplecache::...``,
fsspec cuts a path at ``::``), other schemes (``file:``, ``s3:``, ``memory:``, ``data:``, a drive letter
such as ``C:``), absolute paths (``/etc/x``, ``~/x``, ``\\x``), paths that climb out of the folder
(``../x``) and NUL bytes. A list entry that is a file literally named with a colon in the list's folder
is written ``./name:with-colon.jpg``.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable

from pipeline.config import SourceConfig
from pipeline.sources import detect_kind

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_LOCAL = ("file", "local")
_ALLOWED = "only http(s) URLs and paths relative to the list's folder are read"


class Refused(ValueError):
    """A locator that may not be opened; the message says why (it becomes the row's detail)."""


def is_http(locator: str) -> bool:
    """An ``http:`` or ``https:`` URL (any case): the guarded fetcher's, malformed or not."""
    return locator[:6].lower().startswith(("http:", "https:"))


def confined(entry: str) -> str:
    """``entry``, a relative path that names a file under some folder, normalised (``a/./b/../c`` is
    ``a/c``). Refused for a NUL byte, a ``::`` chain, an absolute path, or one that climbs out."""
    if "\x00" in entry:
        raise Refused("a NUL byte in the path")
    if "::" in entry:
        raise Refused("an fsspec protocol chain ('::')")
    if entry.startswith(("/", "\\", "~")):
        raise Refused("an absolute path")
    clean = posixpath.normpath(entry)
    if clean == ".." or clean.startswith("../"):
        raise Refused("a path that climbs out of its folder")
    if clean == ".":
        raise Refused("the folder itself, not a file")
    return clean


def list_entry(entry: str, list_uri: str) -> str:
    """The locator of one URL-list entry: an http(s) URL as it is, a relative path under the list's
    folder. Refused for anything else (see the module docstring)."""
    if is_http(entry):
        return entry
    scheme = _SCHEME.match(entry)
    if scheme:
        shown = scheme.group(0)[:20]
        raise Refused(f"scheme {shown!r} is not allowed: {_ALLOWED}")
    try:
        clean = confined(entry)
    except Refused as exc:
        raise Refused(f"{exc}: {_ALLOWED}") from None
    folder = list_folder(list_uri)
    return folder + clean if not folder or folder.endswith("/") else f"{folder}/{clean}"


def list_folder(list_uri: str) -> str:
    """The folder of a list file, keeping its protocol (``memory://urls.txt`` is in ``memory://``)."""
    if "://" in list_uri:
        protocol, path = list_uri.split("://", 1)
        return f"{protocol}://{posixpath.dirname(path)}"
    return posixpath.dirname(list_uri)


def _split(uri: str) -> tuple[str, str]:
    if "://" not in uri:
        return "file", uri
    protocol, path = uri.split("://", 1)
    protocol = protocol.lower()
    return ("file" if protocol in _LOCAL else protocol), path


def inside(locator: str, root: str) -> bool:
    """True when ``locator`` names something under the folder ``root``: the same protocol, no ``::``
    chain, no ``..`` segment (sources give normalised locators, and a file system resolves ``..`` after
    symbolic links, which no string check can follow), and a path below the root's."""
    if "\x00" in locator or "::" in locator or "::" in root:
        return False
    lproto, lpath = _split(locator)
    rproto, rpath = _split(root)
    if lproto != rproto or ".." in lpath.split("/"):
        return False
    lpath, rpath = posixpath.normpath(lpath), posixpath.normpath(rpath)
    if rpath == ".":  # a relative root: the working directory
        return not lpath.startswith("/") and lpath not in (".", "..") and not lpath.startswith("../")
    return lpath.startswith(rpath.rstrip("/") + "/")  # "/data/food" holds "/data/food/x", not "/data/foodx"


def source_roots(sources: Iterable[SourceConfig]) -> dict[str, tuple[str, ...]]:
    """The folders each source may read from, by the source's name in the manifests: a dataset's root,
    a URL list's folder; none for a search (its candidates are http(s) URLs only)."""
    roots: dict[str, list[str]] = {}
    for src in sources:
        if src.kind == "search" or not src.uri:
            continue
        kind = src.kind if src.kind != "auto" else detect_kind(src.uri)
        root = list_folder(src.uri) if kind == "urllist" else src.uri
        roots.setdefault(src.name or kind, []).append(root)
    return {name: tuple(found) for name, found in roots.items()}
