"""URL lists: CSV, TSV, Parquet or plain text with a ``url`` column and optional ``label`` and ``split``.

Lists come from strangers, so an entry is one of two things (``pipeline.sources.locators``):

- an ``http://`` or ``https://`` URL, downloaded by the normalize stage through the guarded fetcher
  (``pipeline.crawl.fetch``) only; a malformed one becomes a ``bad_url`` row there;
- a relative path, resolved under the list's own folder with the list's protocol (a list on
  ``s3://bucket/lists/`` names ``s3://bucket/lists/...``); ``a/../b.jpg`` is fine, ``../x`` is not.

Everything else (fsspec protocol chains such as ``simplecache::http://...``, other schemes such as
``file:``, ``s3:``, ``memory:`` or ``data:``, absolute paths, paths that climb out of the folder) is a
candidate refused with ``unsupported_url`` and a detail: it gets a rejected row and is never opened.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pandas as pd

from pipeline import storage
from pipeline.reasons import Reason
from pipeline.sources import Candidate, SourceError, encode_locator
from pipeline.sources.locators import Refused, is_http, list_entry


def load_list(uri: str) -> pd.DataFrame:
    data = storage.read_bytes(uri)
    lowered = uri.lower()
    try:
        if lowered.endswith(".parquet"):
            df = pd.read_parquet(io.BytesIO(data))
        elif lowered.endswith((".csv", ".tsv")):
            df = pd.read_csv(io.BytesIO(data), sep="\t" if lowered.endswith(".tsv") else ",", dtype=str)
        else:
            lines = [ln.strip() for ln in data.decode("utf-8").splitlines()]
            rows = [ln.split(",", 1) if "," in ln else [ln] for ln in lines if ln and not ln.startswith("#")]
            df = pd.DataFrame(
                {"url": [r[0] for r in rows], "label": [r[1] if len(r) > 1 else None for r in rows]}
            )
    except (
        ValueError
    ) as exc:  # not UTF-8, not CSV, not Parquet (UnicodeDecodeError, ParserError, ArrowInvalid)
        raise SourceError(
            f"{uri}: cannot read the URL list ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    if "url" not in df.columns:
        raise SourceError(f"{uri}: a URL list needs a 'url' column; found {list(df.columns)}")
    return df


def _missing(value: Any) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):  # a list or an array in a Parquet cell: not missing, just odd
        return False


def read(uri: str, name: str) -> Iterator[Candidate]:
    df = load_list(uri)
    seen: set[str] = set()
    for row in df.to_dict("records"):
        if _missing(row["url"]):  # an empty cell, not the file "nan"
            continue
        entry = str(row["url"]).strip()
        if not entry or entry in seen:
            continue
        seen.add(entry)
        label = row.get("label")
        label = None if _missing(label) or str(label).strip() == "" else str(label).strip()
        split = row.get("split")
        split = None if _missing(split) else str(split).strip() or None
        try:
            locator = list_entry(entry, uri)
        except Refused as exc:  # never opened: the normalize stage writes a rejected row for it
            yield Candidate(name, entry, encode_locator(entry), label, split, reason=Reason.UNSUPPORTED_URL,
                            detail=str(exc))  # fmt: skip
            continue
        yield Candidate(
            name, entry, encode_locator(locator), label, split, url=entry if is_http(entry) else None
        )
