"""URL lists: CSV, TSV, Parquet or plain text with a ``url`` column and optional ``label`` and ``split``.

Entries are any fsspec path or URI; relative paths are taken relative to the list's folder. http(s)
URLs are downloaded by the normalize stage through the guarded fetcher (``pipeline.crawl.fetch``).
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterator

import pandas as pd

from pipeline import storage
from pipeline.sources import Candidate, SourceError, encode_locator


def load_list(uri: str) -> pd.DataFrame:
    data = storage.read_bytes(uri)
    lowered = uri.lower()
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
    if "url" not in df.columns:
        raise SourceError(f"{uri}: a URL list needs a 'url' column; found {list(df.columns)}")
    return df


def _resolve(entry: str, list_uri: str) -> str:
    if "://" in entry or entry.startswith("/"):
        return entry
    return storage.join(posixpath.dirname(list_uri), entry)


def read(uri: str, name: str) -> Iterator[Candidate]:
    df = load_list(uri)
    seen: set[str] = set()
    for row in df.to_dict("records"):
        entry = str(row["url"]).strip()
        if not entry or entry in seen:
            continue
        seen.add(entry)
        label = row.get("label")
        label = None if label is None or pd.isna(label) or str(label).strip() == "" else str(label).strip()
        split = row.get("split")
        split = None if split is None or pd.isna(split) else str(split).strip() or None
        locator = _resolve(entry, uri)
        url = entry if "://" in entry else None
        yield Candidate(name, entry, encode_locator(locator), label, split, url=url)
