"""``cropclean synth --backgrounds real``: backgrounds cut from the photographs bundled with scikit-learn
and scikit-image, with the generator's objects, boxes and label flips on top."""

from __future__ import annotations

import socket
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import photos, synth
from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.synth import synthesize

NOISE = 6  # the generator's sensor noise: every pixel moves by at most this much per channel
FRINGE = 3  # anti-aliased edge pixels under a quarter covered lie outside the box, this close to it


@pytest.fixture(scope="module")
def bundled() -> synth.Photos:
    pytest.importorskip("skimage", reason="scikit-image (the dev extra) bundles the photos")
    return photos.load()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _outside(shape: tuple[int, int], box: tuple[int, int, int, int], margin: int) -> np.ndarray:
    """Mask of the pixels farther than `margin` from the box."""
    h, w = shape
    x0, y0, x1, y1 = box
    out = np.ones((h, w), bool)
    out[max(0, y0 - margin) : y1 + margin, max(0, x0 - margin) : x1 + margin] = False
    return out


def _block_means(arr: np.ndarray, k: int) -> np.ndarray:
    """Means over k x k blocks (the image cut to whole blocks), per channel."""
    h, w = arr.shape[0] // k * k, arr.shape[1] // k * k
    a = arr[:h, :w].astype(np.float64)
    return a.reshape(h // k, k, w // k, k, -1).mean(axis=(1, 3))


def _grid_means(arr: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Mean colour of each cell of the grid with row edges ys and column edges xs."""
    cells = [[arr[y0:y1, x0:x1].mean(axis=(0, 1)) for x0, x1 in pairwise(xs)] for y0, y1 in pairwise(ys)]
    return np.array(cells)


def _edges(lo: float, hi: float, n: int) -> np.ndarray:
    return np.linspace(lo, hi, n + 1).round().astype(int)


def _reference(name: str) -> np.ndarray:
    """A bundled photo read straight from its package, not through pipeline.photos."""
    if name in ("china", "flower"):
        import sklearn.datasets

        path = Path(sklearn.datasets.__file__).parent / "images" / f"{name}.jpg"
        return np.asarray(Image.open(path).convert("RGB"))
    import skimage.data

    arr = getattr(skimage.data, name)()
    return np.asarray(arr[0] if name == "stereo_motorcycle" else arr)


def test_photos_load_offline_and_are_colour_scenes(bundled, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    photos._load.cache_clear()
    try:
        loaded = photos.load()
    finally:
        photos._load.cache_clear()
    assert [name for name, _ in loaded] == [name for _, name in photos.PHOTOS]
    for name, img in loaded:
        assert img.mode == "RGB" and min(img.size) >= 300, name
        arr = np.asarray(img)
        assert np.array_equal(arr, _reference(name)), name
        spread = arr.astype(np.int16).max(axis=2) - arr.astype(np.int16).min(axis=2)
        assert spread.mean() > 15, f"{name} is not a colour photo"


def test_backgrounds_are_crops_of_the_bundled_photos(bundled):
    seen = set()
    for i in range(60):
        rng = np.random.default_rng([5, i])
        w, h = [(160, 120), (120, 160), (128, 128), (228, 128)][i % 4]
        img, where = photos.background(rng, w, h, bundled)
        seen.add(where.photo)
        assert img.size == (w, h) and img.mode == "RGB"
        arr = np.asarray(img)
        if where.mirrored:
            arr = arr[:, ::-1]
        # The crop box, cut from the package's own copy with numpy and block-averaged, matches the
        # background block-averaged the same way (the resampling only smooths within blocks).
        x0, y0, x1, y1 = where.box
        ref = _reference(where.photo)
        assert 0 <= x0 < x1 <= ref.shape[1] and 0 <= y0 < y1 <= ref.shape[0]
        assert abs((x1 - x0) / (y1 - y0) - w / h) < 0.02
        ys, xs = _edges(y0, y1, 8), _edges(x0, x1, 8)
        got = _grid_means(arr, _edges(0, h, 8), _edges(0, w, 8))
        assert np.abs(got - _grid_means(ref, ys, xs)).mean() < 3, where
        # Not any photo would do: the other photos' same boxes (where they fit) are far off.
        for name, _ in bundled:
            other = _reference(name)
            if name != where.photo and other.shape[0] >= y1 and other.shape[1] >= x1:
                assert np.abs(got - _grid_means(other, ys, xs)).mean() > 8, (where, name)
    assert seen == {name for _, name in photos.PHOTOS}


@pytest.mark.parametrize("shape", synth.SHAPES)
def test_box_is_where_the_object_was_pasted(bundled, shape):
    styles = synth.class_styles(8)
    for i in range(6):
        style = synth.ClassStyle(shape, styles[i].texture, styles[i].colors)
        w, h = [(200, 150), (150, 200), (160, 160), (284, 160), (64, 48), (96, 96)][i]
        # The same draws give the background alone and the rendered image (clutter 0: no decoys).
        bg, _ = photos.background(np.random.default_rng([11, i]), w, h, bundled)
        img, box = synth._render(
            np.random.default_rng([11, i]), style, w, h, styles, 0.0, bundled, synth.OBJECT_SCALE_REAL
        )
        assert box is not None and img.size == (w, h)
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        diff = np.abs(np.asarray(img, np.int16) - np.asarray(bg, np.int16)).max(axis=2)
        # Outside the box only the sensor noise changed the photo.
        assert diff[_outside((h, w), box, FRINGE)].max() <= NOISE
        # Inside, the object covers much of the box and reaches its four sides.
        changed = diff > NOISE
        inside = changed[y0:y1, x0:x1]
        assert inside.mean() > 0.3, (shape, i)
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        assert rows[0] <= 1 and rows[-1] >= y1 - y0 - 2 and cols[0] <= 1 and cols[-1] >= x1 - x0 - 2
        # A third to half of the short side (the box of a rotated shape a little more or less).
        assert 0.25 * min(w, h) <= max(x1 - x0, y1 - y0) <= 0.65 * min(w, h) + 2


def test_same_arguments_same_bytes(bundled, tmp_path):
    kw = dict(classes=3, per_class=5, seed=4, image_side=96, backgrounds="real")
    synthesize(str(tmp_path / "a"), **kw)
    synthesize(str(tmp_path / "b"), **kw)
    synthesize(str(tmp_path / "c"), **{**kw, "seed": 5})
    synthesize(str(tmp_path / "synthetic"), **{**kw, "backgrounds": "synthetic"})
    a, b, c, generated = (_files(tmp_path / p) for p in ("a", "b", "c", "synthetic"))
    assert a == b
    assert a.keys() != c.keys() or any(a[k] != c[k] for k in a)
    # Same plan (files, labels, kinds) as generated backgrounds; other pixels.
    truth = {p: pq.read_table(tmp_path / p / "ground_truth.parquet").to_pandas() for p in ("a", "synthetic")}
    same = ["source_key", "split", "given_label", "true_label", "kind", "duplicate_of", "variant"]
    assert truth["a"][same].equals(truth["synthetic"][same])
    clean = truth["a"].loc[truth["a"]["kind"] == "clean", "source_key"]
    assert all(a[k] != generated[k] for k in clean)


def test_written_files_show_the_photo_outside_the_box(bundled, tmp_path, monkeypatch):
    drawn: list[tuple[np.ndarray, photos.Placement]] = []
    background = photos.background

    def recording(rng, w, h, pool):
        img, where = background(rng, w, h, pool)
        drawn.append((np.asarray(img, np.float64), where))
        return img, where

    monkeypatch.setattr(photos, "background", recording)
    root = tmp_path / "data"
    summary = synthesize(str(root), classes=3, per_class=8, noise=0.2, seed=2, image_side=128,
                         backgrounds="real", clutter=0.0)  # fmt: skip
    rows = pq.read_table(root / "ground_truth.parquet").to_pylist()
    assert summary.counts["label_flip"] >= 1
    assert {w.photo for _, w in drawn} <= {name for _, name in photos.PHOTOS}
    k = 4
    checked = 0
    for r in rows:
        if r["kind"] not in ("clean", "label_flip"):
            continue
        flipped = r["true_label"] != r["given_label"]
        assert flipped == (r["kind"] == "label_flip")
        img = np.asarray(Image.open(root / r["source_key"]).convert("RGB"), np.float64)
        h, w = img.shape[:2]
        assert (r["width"], r["height"]) == (w, h)
        box = (r["x0"], r["y0"], r["x1"], r["y1"])
        assert 1 / 3 * min(w, h) - 2 <= max(box[2] - box[0], box[3] - box[1]) <= 0.65 * min(w, h) + 2
        # Blocks wholly outside the box (and its fringe) average to the photo; those inside do not.
        outside = _block_means(_outside((h, w), box, FRINGE)[..., None].astype(float), k)[..., 0] == 1
        x0, y0, x1, y1 = (box[0] + k - 1) // k, (box[1] + k - 1) // k, box[2] // k, box[3] // k
        diffs = []
        for bg, _ in (d for d in drawn if d[0].shape == img.shape):
            blocks = np.abs(_block_means(img, k) - _block_means(bg, k)).mean(axis=2)
            diffs.append((blocks[outside].mean(), blocks[y0:y1, x0:x1].mean()))
        best_outside, best_inside = min(diffs)
        assert best_outside < 2.5, r["source_key"]
        assert best_inside > 15, r["source_key"]
        checked += 1
    assert checked >= 3 * 8


def test_missing_scikit_image_is_one_line_naming_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage now raises ImportError
    with pytest.raises(ConfigError, match="scikit-image"):
        synthesize(str(tmp_path / "lib"), classes=2, per_class=2, backgrounds="real")
    assert not (tmp_path / "lib").exists()
    capsys.readouterr()
    assert main(["synth", str(tmp_path / "cli"), "--backgrounds", "real"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scikit-image" in err and "Traceback" not in err
    assert not (tmp_path / "cli").exists()


def test_cli_real_backgrounds_and_object_scale(bundled, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["synth", str(out), "--classes", "2", "--per-class", "3", "--backgrounds", "real",
                 "--object-scale", "0.5,0.6", "--clutter", "0"]) == 0  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    rows = [r for r in pq.read_table(out / "ground_truth.parquet").to_pylist() if r["kind"] == "clean"]
    for r in rows:
        side = max(r["x1"] - r["x0"], r["y1"] - r["y0"])
        assert side >= 0.5 * min(r["width"], r["height"]) - 2
    with pytest.raises(SystemExit):
        main(["synth", str(tmp_path / "bad"), "--object-scale", "0.6,0.5"])
    with pytest.raises(SystemExit):
        main(["synth", str(tmp_path / "bad"), "--backgrounds", "painted"])
    with pytest.raises(ValueError, match="backgrounds"):
        synthesize(str(tmp_path / "bad"), classes=2, per_class=2, backgrounds="painted")
