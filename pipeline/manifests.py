"""Parquet manifests: schemas from ``schemas/``, validated on write, versioned, written atomically.

The schemas live in the repository's top-level ``schemas/``, which the wheel ships inside the package
as ``pipeline/schemas/`` (pyproject.toml maps the package ``pipeline.schemas`` to that folder).
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline import storage


def _schema_dir() -> Traversable:
    """``schemas/`` inside the package where the wheel put it; else, in a source checkout (an editable
    install, the tests, a Ray job's working_dir), the top-level ``schemas/`` beside the package."""
    packaged = resources.files("pipeline") / "schemas"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "schemas"


SCHEMA_DIR = _schema_dir()
META_NAME = b"cropclean.schema"
META_VERSION = b"cropclean.schema_version"

_ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "bool": pa.bool_(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint64": pa.uint64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "binary": pa.binary(),
    "list<string>": pa.list_(pa.string()),
    "list<int64>": pa.list_(pa.int64()),
    "list<float32>": pa.list_(pa.float32()),
    "list<float64>": pa.list_(pa.float64()),
}


class ManifestError(ValueError):
    """A manifest does not match its schema, or has a version this code cannot read."""


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool
    meaning: str


@dataclass(frozen=True)
class Schema:
    name: str
    version: str
    columns: tuple[Column, ...]

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def arrow_schema(self) -> pa.Schema:
        fields = [pa.field(c.name, _ARROW_TYPES[c.type], nullable=c.nullable) for c in self.columns]
        meta = {META_NAME: self.name.encode(), META_VERSION: self.version.encode()}
        return pa.schema(fields, metadata=meta)


@functools.cache
def load_schema(name: str) -> Schema:
    """The schema named ``name`` (``schemas/<name>.yaml``)."""
    path = SCHEMA_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".yaml") for p in SCHEMA_DIR.iterdir() if p.name.endswith(".yaml"))
        raise ManifestError(f"no schema named {name!r}; known schemas: {', '.join(known)}")
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    cols = []
    for c in doc["columns"]:
        if c["type"] not in _ARROW_TYPES:
            raise ManifestError(f"schema {name}: column {c['name']} has unknown type {c['type']!r}")
        cols.append(Column(c["name"], c["type"], bool(c["nullable"]), c.get("meaning", "")))
    return Schema(doc["name"], str(doc["version"]), tuple(cols))


def conform(schema: Schema, data: pd.DataFrame | pa.Table) -> pa.Table:
    """Cast ``data`` to the schema: every column present, in order, of its type, no nulls where forbidden.

    Extra columns are an error (a typo in a column name must not pass silently).
    """
    table = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False)
    extra = [n for n in table.column_names if n not in schema.names]
    if extra:
        raise ManifestError(f"{schema.name}: unknown columns {extra}; allowed: {schema.names}")
    missing = [c.name for c in schema.columns if c.name not in table.column_names and not c.nullable]
    if missing:
        raise ManifestError(f"{schema.name}: missing required columns {missing}")
    arrays = []
    for col in schema.columns:
        typ = _ARROW_TYPES[col.type]
        if col.name not in table.column_names:
            arrays.append(pa.nulls(table.num_rows, typ))
            continue
        arr = table.column(col.name)
        try:
            arr = arr.cast(typ) if arr.type != typ else arr
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ManifestError(
                f"{schema.name}.{col.name}: cannot cast {arr.type} to {col.type}: {exc}"
            ) from exc
        if not col.nullable and arr.null_count:
            raise ManifestError(f"{schema.name}.{col.name}: {arr.null_count} nulls in a non-nullable column")
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=schema.arrow_schema())


def write_manifest(name: str, data: pd.DataFrame | pa.Table, uri: str) -> pa.Table:
    """Validate ``data`` against schema ``name`` and write it to ``uri`` atomically."""
    table = conform(load_schema(name), data)
    write_table_atomic(table, uri)
    return table


def write_table_atomic(table: pa.Table, uri: str) -> None:
    """Write any Arrow table as Parquet to ``uri`` without ever exposing a partial file."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes_atomic(uri, buf.getvalue())


def read_table(uri: str) -> pa.Table:
    fs, path = storage.get_fs(uri)
    return pq.read_table(path, filesystem=fs)


def read_manifest(name: str, uri: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a manifest, refusing one written under an unknown major version of its schema."""
    fs, path = storage.get_fs(uri)
    meta = pq.read_schema(path, filesystem=fs).metadata or {}
    found_name = meta.get(META_NAME, b"").decode()
    found_version = meta.get(META_VERSION, b"").decode()
    schema = load_schema(name)
    if found_name != name:
        raise ManifestError(f"{uri} is not a {name!r} manifest (it says {found_name or 'nothing'!r})")
    try:
        major = int(found_version.split(".")[0])
    except ValueError:
        major = -1
    if major != schema.major:
        raise ManifestError(
            f"{uri} was written with {name} schema version {found_version or '?'}; this cropclean reads "
            f"major version {schema.major} only. Re-run the stage that writes it, or use the cropclean "
            f"version that wrote it."
        )
    return pq.read_table(path, filesystem=fs, columns=columns).to_pandas()


def write_classes(classes: list[str], uri: str) -> None:
    """The class names in label-index order, as ``models/classes.json`` (schema ``classes``)."""
    storage.write_text_atomic(uri, json.dumps(check_classes(classes, uri)))


def read_classes(uri: str) -> list[str]:
    """``models/classes.json`` checked against schema ``classes``: a JSON list of unique strings (it may
    come from another run, e.g. ``cropclean predict --models``). A bad file raises ManifestError."""
    try:
        classes = json.loads(storage.read_text(uri))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{uri}: not a classes file (invalid JSON: {exc})") from exc
    return check_classes(classes, uri)


def check_classes(classes: Any, uri: str) -> list[str]:
    schema = load_schema("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
        raise ManifestError(f"{uri}: not a {schema.name} file: expected a JSON list of class names")
    if len(set(classes)) != len(classes):
        raise ManifestError(f"{uri}: a class name appears twice")
    return list(classes)
