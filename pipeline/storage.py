"""All file I/O goes through fsspec URIs: local paths, ``memory://``, ``s3://`` (with the ``s3`` extra)."""

from __future__ import annotations

import os
import posixpath
import re
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem


def get_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``uri`` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


_SEGMENTS = re.compile(r"/|::")


class UnsafePath(ValueError):
    """A path part that would climb out of the folder it is joined to."""


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme of ``base``. The result stays under ``base``: a part
    with a ``..`` segment (between slashes or before ``::``, where fsspec cuts a path) or a NUL byte, or
    one that is not text, raises UnsafePath; leading and trailing slashes are dropped, so an absolute
    part lands under ``base`` too. ``base`` itself is trusted.

    Backslashes are ordinary characters here (POSIX paths, object keys); names from strangers are
    checked further by ``pipeline.names`` before they reach a path."""
    if not parts:
        return base
    for part in parts:
        if not isinstance(part, str):
            raise UnsafePath(f"{part!r} is not a path (under {base})")
    cleaned = [p.strip("/") for p in parts]
    for part in cleaned:
        # fsspec cuts a path at '::' (a protocol chain), so "a/..::b" opens as "a/..": both split segments.
        if "\x00" in part or ".." in _SEGMENTS.split(part):
            raise UnsafePath(f"{part!r} would leave {base}")
    return posixpath.join(base.rstrip("/"), *cleaned)


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def exists(uri: str) -> bool:
    fs, path = get_fs(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = get_fs(uri)
    return fs.cat_file(path)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers never see a partial file.

    Local and memory filesystems: a temporary name in the same folder, then a rename. Object stores
    (S3, GCS) publish an object only once its upload completes, so a single put is already atomic.
    """
    fs, path = get_fs(uri)
    parent = posixpath.dirname(path)
    if isinstance(fs, LocalFileSystem):  # the hot path of every blob: plain syscalls
        os.makedirs(parent or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if protocol_of(uri) == "memory":
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_text_atomic(uri: str, text: str) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"))


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly under the folder ``uri`` (full URIs, sorted); empty when the folder is missing."""
    fs, path = get_fs(uri)
    if not fs.exists(path):
        return []
    entries = fs.ls(path, detail=True)
    names = [e["name"] for e in entries if e.get("type") == "file" and e["name"].endswith(suffix)]
    return sorted(join(uri, posixpath.basename(n)) for n in names)


def remove(uri: str) -> None:
    """Delete a file or a folder with everything under it; nothing when it is missing."""
    fs, path = get_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
