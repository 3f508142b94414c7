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
    "image_id": "a2",
    "group_id": "a1",
    "kept_id": "a1",
    "kind": "near",
    "distance": 6,
    "cross_label": False,
    "cross_split": False,
    "verify_score": 0.125,
    "verified_by": "thumbnail",
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
    assert meta[b"cropclean.schema"] == b"duplicates" and meta[b"cropclean.schema_version"] == b"1.1"
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
    assert read_manifest("duplicates", uri)["image_id"].tolist() == ["a2"]
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


# ------------------------------------------------------------------ manifests edited by hand (names)


def _files_under(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _jpeg(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def test_split_stage_refuses_the_bad_names_of_an_older_or_edited_manifest(tmp_path):
    """Rows the sources stage of this version would have refused (an older version's manifest, a hand
    edit, a relabel verdict edited into overrides.parquet) leave the dataset with the reason, and no row
    keeps the name."""
    from pipeline.annotate.verdicts import overrides_uri
    from pipeline.stages.base import RunContext
    from pipeline.stages.sources import image_id_for
    from pipeline.stages.split import SplitStage
    from tests.conftest import ingest_config

    cfg = ingest_config(tmp_path / "src", tmp_path / "run", "balance.min_per_class=0")
    ctx = RunContext(cfg=cfg)
    rows = [{"image_id": image_id_for("list", f"{label}{i}"), "label": label, "split": None, "status": "ok"}
            for label in ("pho", "ramen", "crème_brûlée") for i in range(4)]  # fmt: skip
    hostile = [
        ("../../escape", None, "bad_label"),
        ("a/b", "train", "bad_label"),
        ("x\ny", None, "bad_label"),
        ("pho", "../x", "bad_split"),
        ("pho", "Train", "bad_split"),
    ]
    for n, (label, split, _) in enumerate(hostile):
        rows.append(
            {"image_id": image_id_for("list", f"h{n}"), "label": label, "split": split, "status": "ok"}
        )
    rows.append({"image_id": "../../x", "label": "pho", "split": None, "status": "ok"})
    rows.append({"image_id": image_id_for("list", "f"), "label": "../y", "split": "..", "status": "failed",
                 "reason": "missing_file"})  # fmt: skip
    frame = pd.DataFrame(rows).assign(source="list", source_key=lambda d: d["image_id"])
    write_manifest("images", frame, ctx.layout.deduped_images)
    relabelled = rows[0]["image_id"]
    write_manifest("overrides", pd.DataFrame([{"image_id": relabelled, "verdict": "relabel", "label": "pho",
                                               "new_label": "../../z", "source": "edited.csv",
                                               "imported_at": pd.Timestamp.now()}]),
                   overrides_uri(cfg.out))  # fmt: skip

    stats = SplitStage().run(ctx).stats

    images = read_manifest("images", ctx.manifest("images")).set_index("image_id")
    for n, (label, split, reason) in enumerate(hostile, start=12):
        got = images.loc[rows[n]["image_id"]]
        assert (got["status"], got["reason"]) == ("rejected", reason), (label, split)
        assert repr(label if reason == "bad_label" else split) in got["detail"]
    assert tuple(images.loc["../../x", ["status", "reason"]]) == ("rejected", "bad_image_id")
    failed = images.loc[rows[-1]["image_id"]]
    assert failed["reason"] == "missing_file" and pd.isna(failed["label"]) and pd.isna(failed["split"])
    moved = images.loc[relabelled]
    assert (moved["status"], moved["reason"], moved["relabelled_from"]) == ("rejected", "bad_label", "pho")
    assert "'../../z'" in moved["detail"]
    assert stats["bad_names"] == 7 and stats["ok"] == 11 and stats["classes"] == 3
    from pipeline.names import label_problem, split_problem

    assert images["label"].dropna().map(label_problem).isna().all()
    assert images["split"].dropna().map(split_problem).isna().all()


def test_report_leaves_out_rows_whose_names_would_leave_out(tmp_path):
    """A hand-edited run: an image id, a label, a split, a suggested label and a path that would lead
    out of OUT. The report still builds, shows the good images, and writes nothing outside OUT/report."""
    from pipeline.report import build_report
    from pipeline.report.data import read_run
    from pipeline.stages.sources import image_id_for
    from tests.conftest import ingest_config

    out = tmp_path / "a" / "b" / "run"
    cfg = ingest_config(tmp_path / "src", out)
    (out / "blobs").mkdir(parents=True)
    (out / "run.yaml").write_text(cfg.to_yaml())
    good = [image_id_for("list", str(i)) for i in range(3)]
    for i in range(3):
        (out / "blobs" / f"{i}.jpg").write_bytes(_jpeg(i))
    escape = "../../../escape"
    rows = [(good[0], "pho", "train", "blobs/0.jpg"), (good[1], "ramen", "test", "blobs/1.jpg"),
            (escape, "pho", "train", "blobs/2.jpg"),
            (image_id_for("list", "l"), escape, "train", "blobs/2.jpg"),
            (image_id_for("list", "s"), "pho", "../..", "blobs/2.jpg"),
            (good[2], "ramen", "train", "../../../../escape.jpg")]  # fmt: skip
    images = pd.DataFrame(rows, columns=["image_id", "label", "split", "path"]).assign(
        source="list", source_key=lambda d: d["image_id"], status="ok", width=96, height=96
    )
    write_manifest("images", images, str(out / "manifests" / "images.parquet"))
    crops = images[["image_id", "label", "split"]].assign(
        target="label", method=cfg.crop.method, mode=cfg.crop.mode, x0=8, y0=8, x1=72, y1=72, score=0.9
    )
    write_manifest("crops", crops, str(out / "manifests" / "crops.parquet"))
    blacklist = pd.DataFrame([
        {"image_id": good[0], "label": "pho", "split": "train", "reason": "label_not_found", "score": 0.9,
         "suggested_label": escape},
        {"image_id": good[1], "label": "ramen", "split": "test", "reason": "label_not_found", "score": 0.8,
         "suggested_label": "pho"},
        {"image_id": escape, "label": "pho", "split": "train", "reason": "label_not_found", "score": 0.7},
    ])  # fmt: skip
    write_manifest("blacklist", blacklist, str(out / "manifests" / "blacklist.parquet"))
    dups = pd.DataFrame([{**ROW, "image_id": escape, "group_id": good[0], "kept_id": good[0]},
                         {**ROW, "image_id": good[0], "group_id": good[0], "kept_id": good[0]}])  # fmt: skip
    write_manifest("duplicates", dups, str(out / "manifests" / "duplicates.parquet"))
    before = _files_under(tmp_path)

    result = build_report(str(out))

    new = _files_under(tmp_path) - before
    assert new and all(p.startswith("a/b/run/report/") for p in new), sorted(new)
    assert {p for p in new if "/thumbs/" in p} == {f"a/b/run/report/thumbs/{i}.jpg" for i in good[:2]}
    assert result.pages >= 3
    run = read_run(str(out))
    assert set(run.images["image_id"]) == {good[0], good[1], good[2]}
    assert run.images.set_index("image_id")["path"].isna().tolist() == [False, False, True]
    assert set(run.blacklist["image_id"]) == {good[1]} and set(run.duplicates["image_id"]) == {good[0]}
    assert run.classes == ["pho", "ramen"]
