"""Manifests: schema validation on write, version in metadata, refusal of unknown versions, atomic writes,
and the same code on local disk, memory:// and S3 (moto's server on loopback, through s3fs)."""

from __future__ import annotations

import socket

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import manifests, storage
from pipeline.manifests import ManifestError, load_schema, read_manifest, write_manifest

ROW = {
    "image_id": "a1",
    "group_id": "a1",
    "kept_id": "a1",
    "kind": "exact",
    "distance": 0,
    "cross_label": False,
    "cross_split": False,
}


def test_every_schema_loads_with_meanings():
    for name in ("images", "duplicates", "crops", "blacklist", "predictions"):
        schema = load_schema(name)
        assert schema.major == 1
        assert all(c.meaning for c in schema.columns), name
    assert {
        "image_id",
        "source",
        "source_key",
        "label",
        "split",
        "status",
        "reason",
        "sha256",
        "phash",
        "width",
        "height",
        "orig_width",
        "orig_height",
        "path",
    } <= set(load_schema("images").names)


def test_write_casts_orders_and_records_version(tmp_path):
    uri = str(tmp_path / "m" / "duplicates.parquet")
    df = pd.DataFrame([ROW])[list(reversed(ROW))]  # columns out of order, distance as int64
    write_manifest("duplicates", df, uri)
    meta = pq.read_schema(uri).metadata
    assert meta[b"cropclean.schema"] == b"duplicates" and meta[b"cropclean.schema_version"] == b"1.0"
    table = pq.read_table(uri)
    assert table.column_names == load_schema("duplicates").names
    assert table.schema.field("distance").type == pa.int32()
    assert read_manifest("duplicates", uri).to_dict("records") == [ROW]
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["duplicates.parquet"]  # no temporary left


def test_invalid_tables_are_refused(tmp_path):
    uri = str(tmp_path / "d.parquet")
    with pytest.raises(ManifestError, match="unknown columns"):
        write_manifest("duplicates", pd.DataFrame([{**ROW, "kindd": "x"}]), uri)
    with pytest.raises(ManifestError, match="missing required columns"):
        write_manifest("duplicates", pd.DataFrame([{k: v for k, v in ROW.items() if k != "kept_id"}]), uri)
    with pytest.raises(ManifestError, match="nulls in a non-nullable column"):
        write_manifest("duplicates", pd.DataFrame([{**ROW, "group_id": None}]), uri)
    with pytest.raises(ManifestError, match="cannot cast"):
        write_manifest("duplicates", pd.DataFrame([{**ROW, "distance": "far"}]), uri)
    assert not (tmp_path / "d.parquet").exists()


def test_unknown_major_version_is_refused_with_a_clear_message(tmp_path):
    uri = str(tmp_path / "d.parquet")
    table = manifests.conform(load_schema("duplicates"), pd.DataFrame([ROW]))
    pq.write_table(
        table.replace_schema_metadata(
            {b"cropclean.schema": b"duplicates", b"cropclean.schema_version": b"2.0"}
        ),
        uri,
    )
    with pytest.raises(ManifestError, match=r"schema version 2\.0; this cropclean reads major version 1"):
        read_manifest("duplicates", uri)
    with pytest.raises(ManifestError, match="is not a 'images' manifest"):
        read_manifest("images", uri)


def test_memory_filesystem_round_trip():
    uri = "memory://cropclean-test/run/manifests/duplicates.parquet"
    write_manifest("duplicates", pd.DataFrame([ROW]), uri)
    assert read_manifest("duplicates", uri)["image_id"].tolist() == ["a1"]
    assert storage.list_files("memory://cropclean-test/run/manifests") == [uri]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch):
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(k, v)
    import boto3
    import s3fs

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bucket")
    s3fs.S3FileSystem.clear_instance_cache()
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_s3_round_trip_through_s3fs(s3_server):
    uri = "s3://bucket/run/manifests/duplicates.parquet"
    write_manifest("duplicates", pd.DataFrame([ROW]), uri)
    assert storage.exists(uri)
    assert read_manifest("duplicates", uri).to_dict("records") == [ROW]
    storage.write_text_atomic("s3://bucket/run/run.yaml", "out: s3://bucket/run\n")
    assert storage.read_text("s3://bucket/run/run.yaml") == "out: s3://bucket/run\n"
    assert storage.list_files("s3://bucket/run/manifests") == [uri]
