"""The synthetic Food-101-layout dataset: layout, ground truth, determinism and injected problems."""

from __future__ import annotations

import io
import re
import struct
from collections import Counter
from pathlib import Path

import fsspec
import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline import synth
from pipeline.synth import SynthSummary, synthesize

ALL_KINDS = {
    "clean",
    "label_flip",
    "exact_duplicate",
    "near_duplicate",
    "hard_negative",
    *synth.HOSTILE_KINDS,
}
PILLOW_DEFAULT_LIMIT = 89_478_485


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSummary, list[dict]]:
    root = tmp_path_factory.mktemp("synth") / "data"
    summary = synthesize(str(root), classes=5, per_class=20, noise=0.1, seed=3, image_side=160)
    rows = pq.read_table(root / "ground_truth.parquet").to_pylist()
    return root, summary, rows


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _of_kind(rows: list[dict], kind: str) -> list[dict]:
    found = [r for r in rows if r["kind"] == kind]
    assert found, f"no {kind} file"
    return found


def test_layout_and_meta_files_cover_every_image_once(dataset):
    root, summary, rows = dataset
    images = sorted(str(p.relative_to(root)) for p in (root / "images").rglob("*") if p.is_file())
    assert len(images) == summary.n_files == len(rows) == sum(summary.counts.values())
    assert sorted(r["source_key"] for r in rows) == images
    assert all(re.fullmatch(r"images/[a-z_0-9]+/\d{6}\.jpg", k) for k in images)
    assert len({Path(k).stem for k in images}) == len(images), "ids must be unique across the dataset"

    classes = (root / "meta/classes.txt").read_text().splitlines()
    assert classes == sorted(classes) == summary.classes
    listed: dict[str, str] = {}
    for split in ("train", "test"):
        lines = (root / f"meta/{split}.txt").read_text().splitlines()
        assert lines == sorted(lines)
        for line in lines:
            assert line not in listed, f"{line} listed twice"
            listed[line] = split
    assert sorted(f"images/{line}.jpg" for line in listed) == images
    for r in rows:
        assert listed[r["source_key"][len("images/") : -len(".jpg")]] == r["split"]
        assert r["source_key"].split("/")[1] == r["given_label"]
        assert r["given_label"] in classes
        assert r["true_label"] is None or r["true_label"] in classes


def test_ground_truth_schema(dataset):
    root, _, _ = dataset
    table = pq.read_table(root / "ground_truth.parquet")
    assert table.schema.metadata[b"cropclean.ground_truth_version"] == b"2"
    types = {f.name: f.type for f in table.schema}
    assert types["source_key"] == pa.string() and types["cross_label"] == pa.bool_()
    for col in ("x0", "y0", "x1", "y1", "width", "height"):
        assert types[col] == pa.int32()
    assert list(types) == [f.name for f in synth.GROUND_TRUTH_SCHEMA]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    runs = [(tmp_path / "a", 7), (tmp_path / "b", 7), (tmp_path / "c", 8)]
    for path, seed in runs:
        synthesize(str(path), classes=3, per_class=6, seed=seed, image_side=96)
    a, b, c = (_files(path) for path, _ in runs)
    assert a == b
    assert a.keys() != c.keys() or any(a[k] != c[k] for k in a)


def test_clutter_scales_the_background_and_keeps_the_objects(tmp_path):
    runs = {c: tmp_path / f"clutter-{c}" for c in (1.0, 0.0)}
    for clutter, path in runs.items():
        synthesize(str(path), classes=3, per_class=6, seed=7, image_side=96, clutter=clutter)
    synthesize(str(tmp_path / "default"), classes=3, per_class=6, seed=7, image_side=96)
    busy, plain = _files(runs[1.0]), _files(runs[0.0])
    assert busy == _files(tmp_path / "default")  # 1.0 is the default, byte for byte
    truth = {c: pq.read_table(p / "ground_truth.parquet").to_pandas() for c, p in runs.items()}
    same = ["source_key", "given_label", "true_label", "kind"]  # same files, labels and kinds
    assert truth[0.0][same].equals(truth[1.0][same])
    clean = truth[1.0].loc[truth[1.0]["kind"] == "clean", "source_key"]
    # A plain gradient compresses far better than blobs, lines, patches and decoys.
    assert sum(len(plain[k]) for k in clean) < 0.6 * sum(len(busy[k]) for k in clean)
    with pytest.raises(ValueError, match="clutter"):
        synthesize(str(tmp_path / "bad"), classes=2, per_class=2, clutter=-1)


def test_memory_filesystem():
    out = "memory://synth-test/data"
    summary = synthesize(out, classes=2, per_class=4, seed=1, image_side=96)
    fs = fsspec.filesystem("memory")
    keys = pq.read_table(fs.open("/synth-test/data/ground_truth.parquet", "rb")).column("source_key")
    assert len(keys) == summary.n_files
    assert all(fs.exists(f"/synth-test/data/{k}") for k in keys.to_pylist())
    fs.rm("/synth-test", recursive=True)


def test_every_kind_present_even_when_tiny(tmp_path):
    summary = synthesize(str(tmp_path), classes=3, per_class=8, noise=0.1, seed=0, image_side=96)
    assert set(summary.counts) == ALL_KINDS
    rows = pq.read_table(tmp_path / "ground_truth.parquet").to_pylist()
    assert {r["variant"] for r in rows if r["kind"] == "near_duplicate"} == set(synth.NEAR_VARIANTS)
    assert {r["kind"] for r in rows if r["cross_label"]} >= {"exact_duplicate", "near_duplicate"}
    assert {r["kind"] for r in rows if r["cross_split"]} >= {"exact_duplicate", "near_duplicate"}


def test_label_flips_in_train_only_at_about_the_rate(dataset):
    _, _, rows = dataset
    flips = _of_kind(rows, "label_flip")
    assert all(r["split"] == "train" and r["given_label"] != r["true_label"] for r in flips)
    base_train = [r for r in rows if r["kind"] in ("clean", "label_flip") and r["split"] == "train"]
    assert abs(len(flips) / len(base_train) - 0.1) <= 1 / len(base_train)
    assert all(r["given_label"] == r["true_label"] for r in rows if r["kind"] == "clean")


def test_boxes_lie_inside_the_displayed_images(dataset):
    root, _, rows = dataset
    boxed = [r for r in rows if r["x0"] is not None]
    assert len(boxed) > 0.9 * len(rows)
    for r in boxed:
        assert 0 <= r["x0"] < r["x1"] <= r["width"] and 0 <= r["y0"] < r["y1"] <= r["height"], r
        assert r["true_label"] is not None
        if r["expected_status"] == "ok":
            with Image.open(root / r["source_key"]) as im:
                assert ImageOps.exif_transpose(im).size == (r["width"], r["height"])
    for r in _of_kind(rows, "clean"):
        short = min(r["width"], r["height"])
        assert 0.15 * short <= max(r["x1"] - r["x0"], r["y1"] - r["y0"]) <= 0.5 * short


def test_hostile_files_decode_as_expected(dataset, monkeypatch):
    root, _, rows = dataset
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_DEFAULT_LIMIT)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    expected = {
        "zero_byte": ("rejected", "empty_file"),
        "html": ("rejected", "not_an_image"),
        "svg": ("rejected", "unsupported_format"),
        "truncated": ("rejected", "truncated"),
        "too_small": ("rejected", "too_small"),
        "decompression_bomb": ("rejected", "decompression_bomb"),
    }
    for r in rows:
        assert (r["expected_status"], r["expected_reason"]) == expected.get(r["kind"], ("ok", None))

    def data(r: dict) -> bytes:
        return (root / r["source_key"]).read_bytes()

    for kind in ("zero_byte", "html", "svg"):
        for r in _of_kind(rows, kind):
            with pytest.raises(UnidentifiedImageError):
                Image.open(io.BytesIO(data(r)))
            assert r["true_label"] is None and r["x0"] is None
    assert all(data(r) == b"" for r in _of_kind(rows, "zero_byte"))
    for r in _of_kind(rows, "truncated"):
        with Image.open(io.BytesIO(data(r))) as im, pytest.raises(OSError, match="truncated"):
            im.load()
    for r in _of_kind(rows, "too_small"):
        with Image.open(io.BytesIO(data(r))) as im:
            im.load()
            assert max(im.size) < 48
    for r in _of_kind(rows, "decompression_bomb"):
        raw = data(r)
        assert len(raw) < 300_000
        width, height = struct.unpack(">II", raw[16:24])
        assert width * height > 100_000_000 and (width, height) == (r["width"], r["height"])
        with pytest.raises(Image.DecompressionBombError):
            Image.open(io.BytesIO(raw))


def test_odd_but_valid_files_decode(dataset):
    root, _, rows = dataset
    modes = {"cmyk": "CMYK", "grayscale": "L", "png16": "I;16", "palette": "P", "rgba": "RGBA"}
    for kind, mode in modes.items():
        for r in _of_kind(rows, kind):
            with Image.open(root / r["source_key"]) as im:
                im.load()
                assert im.mode == mode
                if kind == "palette":
                    assert "transparency" in im.info
                if kind == "rgba":
                    alpha = im.getchannel("A")
                    assert alpha.getextrema()[0] < 128
                    assert alpha.crop((r["x0"], r["y0"], r["x1"], r["y1"])).getextrema() == (255, 255)
    for r in _of_kind(rows, "animated_gif"):
        with Image.open(root / r["source_key"]) as im:
            assert im.format == "GIF" and im.is_animated and im.n_frames >= 2
    for r in _of_kind(rows, "exif_rotated"):
        with Image.open(root / r["source_key"]) as im:
            assert im.getexif().get(0x0112) in (6, 8)
            assert im.size == (r["height"], r["width"])
            assert ImageOps.exif_transpose(im).size == (r["width"], r["height"])


def test_duplicates(dataset):
    root, _, rows = dataset
    by_key = {r["source_key"]: r for r in rows}
    for r in _of_kind(rows, "exact_duplicate") + _of_kind(rows, "near_duplicate"):
        orig = by_key[r["duplicate_of"]]
        assert orig["kind"] == "clean" and r["true_label"] == orig["true_label"]
        assert r["cross_label"] == (r["given_label"] != orig["given_label"])
        assert r["cross_split"] == (r["split"] != orig["split"])
        assert not (r["cross_label"] and r["split"] == "test")
    for r in _of_kind(rows, "exact_duplicate"):
        assert r["variant"] is None
        assert (root / r["source_key"]).read_bytes() == (root / r["duplicate_of"]).read_bytes()
    near = _of_kind(rows, "near_duplicate")
    distances = []
    for r in near:
        assert r["variant"] in synth.NEAR_VARIANTS
        hashes = [
            imagehash.phash(Image.open(root / k).convert("RGB")) for k in (r["source_key"], r["duplicate_of"])
        ]
        distances.append(hashes[0] - hashes[1])
    assert sum(d <= 10 for d in distances) >= 0.75 * len(distances), distances


def test_class_styles_are_distinct_combinations():
    styles = synth.class_styles(30)
    assert len(set(styles)) == 30
    for i, a in enumerate(styles):
        for b in styles[i + 1 :]:
            assert (a.shape != b.shape) + (a.texture != b.texture) + (a.colors != b.colors) >= 2
    # Recognizing a class needs the combination: shapes and textures are shared between classes.
    assert max(Counter(s.shape for s in styles).values()) > 1
    assert max(Counter(s.texture for s in styles).values()) > 1
    assert synth.class_names(32)[-1] == "class_31"


def test_hard_negatives_share_the_background_and_nothing_else(dataset, tmp_path):
    """Another object on the original's background (or on an overlapping crop of it): a distinct image
    with a correct label, recorded as such; the rest of the dataset is what it is without them."""
    root, summary, rows = dataset
    by_key = {r["source_key"]: r for r in rows}
    hard = _of_kind(rows, "hard_negative")
    assert {r["variant"] for r in hard} == set(synth.HARD_NEGATIVE_VARIANTS)
    assert any(r["given_label"] == by_key[r["background_of"]]["given_label"] for r in hard)
    assert any(r["given_label"] != by_key[r["background_of"]]["given_label"] for r in hard)
    for r in hard:
        orig = by_key[r["background_of"]]
        assert orig["kind"] == "clean" and r["duplicate_of"] is None and not r["cross_label"]
        assert r["given_label"] == r["true_label"] and (r["width"], r["height"]) == (
            orig["width"],
            orig["height"],
        )
        a = np.asarray(Image.open(root / r["source_key"]).convert("RGB"), dtype=np.float32)
        b = np.asarray(Image.open(root / orig["source_key"]).convert("RGB"), dtype=np.float32)
        outside = np.ones(a.shape[:2], dtype=bool)
        for box in (r, orig):
            outside[box["y0"] : box["y1"], box["x0"] : box["x1"]] = False
        inside = ~outside
        gap = np.abs(a - b).mean(axis=2)
        if r["variant"] == "same_background":  # the same pixels but for the two objects (noise, JPEG)
            assert gap[outside].mean() < 8 < gap[inside].mean()
        else:  # a shifted crop of the same scene: different pixels, the same colours
            assert gap[outside].mean() > 8
            assert np.abs(a.mean(axis=(0, 1)) - b.mean(axis=(0, 1))).max() < 25
    assert summary.counts["hard_negative"] == len(hard)

    # Without them every other file is byte for byte the same, under the same name.
    synthesize(
        str(tmp_path / "none"), classes=5, per_class=20, noise=0.1, seed=3, image_side=160, hard_negatives=0
    )
    without = _files(tmp_path / "none")
    with_them = _files(root)
    assert {
        k: v
        for k, v in with_them.items()
        if k.startswith("images/") and k not in {r["source_key"] for r in hard}
    } == {k: v for k, v in without.items() if k.startswith("images/")}
    with pytest.raises(ValueError, match="hard_negatives"):
        synthesize(str(tmp_path / "bad"), classes=2, per_class=2, hard_negatives=2)
