"""Names that become paths: labels, splits and image ids are one safe path segment or are refused with a
reason; ``storage.join`` never climbs out of its base; the path builders of the crop stage and of the
report refuse a hand-edited hostile name without writing anything; an ingest of a URL list with hostile
labels rejects those rows and writes nothing outside OUT."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import pickle
import posixpath
from pathlib import Path
from types import SimpleNamespace

import fsspec
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import manifests, storage
from pipeline.names import (
    MAX_LABEL_BYTES,
    UnsafeName,
    id_problem,
    label_problem,
    safe_id,
    safe_label,
    safe_split,
    split_problem,
)
from pipeline.reasons import Reason
from pipeline.sources import Candidate, encode_locator
from pipeline.stages.sources import checked, image_id_for

NON_UTF8 = b"caf\xe9".decode("utf-8", "surrogateescape")  # a latin-1 folder name, as os.listdir gives it

HOSTILE_LABELS = [
    "..",
    ".",
    "../x",
    "../../escape",
    "x/..",
    "a/b",
    "/abs",
    "a\\b",
    "..\\..\\x",
    "\x00",
    "a\x00b",
    "\n",
    "x\ny",
    "x\r",
    "\t",
    "\x1b[31m",
    "\x7f",
    "a\x85b",  # NEL (C1)
    "a\u2028b",  # LINE SEPARATOR
    "",
    " ",
    "   \t ",
    "\u00a0",  # no-break space only
    "\u200b",  # zero-width space only
    "x" * 300,
    "é" * 101,  # 101 characters, 202 bytes: the limit counts bytes
    NON_UTF8,
    "a::b",  # fsspec would read a protocol chain and cut the path at '::'
    "x::memory",
]
GOOD_LABELS = [
    "crème_brûlée",
    "hot dog",
    "ramen 🍜",
    "👨\u200d👩\u200d👧",  # an emoji sequence joined by U+200D (a format character)
    "a.b",
    "...",
    ".hidden",
    "..a",
    "a..b",
    "C++",
    "a:b",
    "100% juice",
    "what?",
    "pho",
    "x" * MAX_LABEL_BYTES,
    " leading and trailing ",
]
HOSTILE_SPLITS = [
    "",
    "Train",
    " train",
    "train ",
    "validation",
    "..",
    "../train",
    "train/..",
    "a/b",
    "\x00",
    "x\ny",
]
HOSTILE_IDS = ["", ".", "..", "../x", "a/b", "a\\b", "a\x00", "a::b", "é", "id.jpg", " ", "x\ny", "x" * 129]


# ------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize("label", HOSTILE_LABELS, ids=repr)
def test_hostile_labels_are_refused_with_a_reason(label):
    problem = label_problem(label)
    assert isinstance(problem, str) and problem
    with pytest.raises(UnsafeName) as err:
        safe_label(label)
    assert err.value.reason == Reason.BAD_LABEL
    assert repr(label) in str(err.value) and problem in str(err.value)
    str(err.value).encode("utf-8")  # the message is printable text even for a non-UTF-8 name


@pytest.mark.parametrize("label", GOOD_LABELS, ids=repr)
def test_legitimate_labels_pass_unchanged(label):
    assert label_problem(label) is None
    assert safe_label(label) is label


def test_label_limits_and_non_text():
    assert label_problem("é" * (MAX_LABEL_BYTES // 2)) is None  # 200 bytes exactly
    assert "bytes" in label_problem("é" * (MAX_LABEL_BYTES // 2) + "x")
    for value in (None, 3, float("nan"), b"pho"):
        assert label_problem(value).startswith("not text")
        with pytest.raises(UnsafeName):
            safe_label(value)  # type: ignore[arg-type]
    assert label_problem("..") != label_problem("a/b") != label_problem("\n")  # each says what is wrong


# ------------------------------------------------------------------------------------- splits and ids


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_the_three_splits_pass(split):
    assert split_problem(split) is None and safe_split(split) == split


@pytest.mark.parametrize("split", [*HOSTILE_SPLITS, None, 1], ids=repr)
def test_any_other_split_is_refused(split):
    assert split_problem(split)
    with pytest.raises(UnsafeName) as err:
        safe_split(split)
    assert err.value.reason == Reason.BAD_SPLIT
    again = pickle.loads(pickle.dumps(err.value))  # as it crosses from a Ray worker
    assert (again.reason, str(again)) == (Reason.BAD_SPLIT, str(err.value))


@pytest.mark.parametrize("image_id", HOSTILE_IDS, ids=repr)
def test_hostile_image_ids_are_refused(image_id):
    assert id_problem(image_id)
    with pytest.raises(UnsafeName) as err:
        safe_id(image_id)
    assert err.value.reason == Reason.BAD_IMAGE_ID


def test_the_ids_the_code_makes_pass():
    for key in ("images/pho/1.jpg", "https://example.org/x.jpg", "caf\\xe9/1.jpg", "../../x"):
        image_id = image_id_for("src", key)
        assert safe_id(image_id) == image_id
    assert safe_id("a1") == "a1" and safe_id("img_2-b") == "img_2-b"


# --------------------------------------------------------------------------------------- storage.join

BASE = "/tmp/cropclean-out"


@pytest.mark.parametrize(
    "parts",
    [
        ("..",),
        ("../x",),
        ("a", ".."),
        ("a/../..",),
        ("/..",),
        ("x/..",),
        ("..//x",),
        ("a", "b/../../.."),
        ("cropped", "train", "../../escape", "1.jpg"),
        ("..::",),
        ("a/..::b",),
        ("a\x00b",),
        ("\x00",),
        (None,),
        (3,),
    ],
    ids=repr,
)
def test_join_refuses_to_climb_out(parts):
    with pytest.raises(storage.UnsafePath):
        storage.join(BASE, *parts)
    with pytest.raises(storage.UnsafePath):
        storage.join("memory://run", *parts)


def test_join_keeps_ordinary_parts_under_the_base():
    assert (
        storage.join(BASE, "cropped", "train", "crème_brûlée", "a.jpg")
        == f"{BASE}/cropped/train/crème_brûlée/a.jpg"
    )
    assert storage.join(BASE, "/abs/x") == f"{BASE}/abs/x"  # an absolute part lands under the base
    assert storage.join(BASE, "...", "a..b", "..a", ".hidden") == f"{BASE}/.../a..b/..a/.hidden"
    assert storage.join("memory://run/", "x") == "memory://run/x"
    assert storage.join(BASE) == BASE


def test_join_never_resolves_outside_the_base():
    """Every combination of a few hostile tokens: either refused, or a path that stays under the base,
    both as text and as the path fsspec opens (fsspec cuts a path at '::')."""
    tokens = ["..", ".", "/", "a", "\\", "~", ":", "::", "%2e%2e"]
    seen = 0
    for n in range(1, 5):
        for combo in itertools.product(tokens, repeat=n):
            part = "".join(combo)
            try:
                joined = storage.join(BASE, "x", part)
            except storage.UnsafePath:
                assert ".." in part.replace("::", "/").split("/")
                continue
            seen += 1
            assert posixpath.normpath(joined).startswith(f"{BASE}/x")
            try:
                _, opened = fsspec.core.url_to_fs(joined)
            except ValueError as exc:  # "a://" inside a path: fsspec opens nothing
                assert "Protocol not known" in str(exc)
                continue
            assert posixpath.normpath(opened).startswith(f"{BASE}/x"), (part, opened)
    assert seen > 1000


# --------------------------------------------------------------------------------- the central check


def cand(label: str | None, split: str | None = None, **kw) -> Candidate:
    return Candidate("list", "k", encode_locator("/data/k.jpg"), label, split, **kw)


@pytest.mark.parametrize("label", HOSTILE_LABELS, ids=repr)
def test_checked_refuses_a_hostile_label_and_keeps_it_in_the_detail(label):
    c = checked(cand(label, "train"))
    assert (c.reason, c.label, c.split) == (Reason.BAD_LABEL, None, "train")
    assert repr(label) in c.detail


def test_checked_splits_and_already_refused_candidates():
    good = cand("pho", "val")
    assert checked(good) is good
    assert checked(cand(None)) == cand(None)  # unlabelled: the split stage says so later
    c = checked(cand("pho", "../x"))
    assert (c.reason, c.label, c.split) == (Reason.BAD_SPLIT, "pho", None) and "'../x'" in c.detail
    both = checked(cand("a/b", "Train"))
    assert (both.reason, both.label, both.split) == (Reason.BAD_LABEL, None, None)
    assert "'a/b'" in both.detail and "'Train'" in both.detail
    # Refused for its locator already: that reason stands, and the bad label is not kept either.
    refused = checked(cand("../../x", reason=Reason.UNSUPPORTED_URL, detail="scheme ftp"))
    assert (refused.reason, refused.label) == (Reason.UNSUPPORTED_URL, None)
    assert refused.detail.startswith("scheme ftp; label '../../x'")


def test_imagefolder_class_folders_with_hostile_names_are_refused(tmp_path):
    from pipeline.config import SourceConfig
    from pipeline.sources import iter_candidates

    root = tmp_path / "folder"
    names = ["pho", "x\ny", "\x1b[31m", " ", "a::b", "ramen 🍜"]
    for i, name in enumerate(names):
        write(root / name / "1.jpg", jpeg(i))
    latin1 = Path(os.fsdecode(os.fsencode(root) + b"/caf\xe9"))  # not valid UTF-8
    write(latin1 / "1.jpg", jpeg(9))
    got = {c.source_key: c for c in map(checked, iter_candidates(SourceConfig(uri=str(root))))}
    assert {k for k, c in got.items() if c.reason is None} == {"pho/1.jpg", "ramen 🍜/1.jpg"}
    refused = {k.split("/")[0]: c for k, c in got.items() if c.reason}
    assert len(refused) == 5
    for folder, c in refused.items():
        # A name with '::' may be refused for its locator first; the label is not kept either way.
        assert c.reason == Reason.BAD_LABEL or (folder == "a::b" and c.reason == Reason.UNSUPPORTED_URL)
        assert c.label is None and "label " in c.detail


# ------------------------------------------------------------------------------------- path builders


def jpeg(seed: int, side: int = 96) -> bytes:
    """A distinct noise picture (so that no two are near-duplicates)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def files_under(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> content hash)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


GOOD_ID = image_id_for("src", "1.jpg")


def test_cropped_path_refuses_hostile_names():
    from pipeline.layout import cropped_path

    assert cropped_path("train", "crème_brûlée", GOOD_ID) == f"cropped/train/crème_brûlée/{GOOD_ID}.jpg"
    for label in HOSTILE_LABELS:
        with pytest.raises(UnsafeName) as err:
            cropped_path("train", label, GOOD_ID)
        assert err.value.reason == Reason.BAD_LABEL
    for split in HOSTILE_SPLITS:
        with pytest.raises(UnsafeName) as err:
            cropped_path(split, "pho", GOOD_ID)
        assert err.value.reason == Reason.BAD_SPLIT
    for image_id in HOSTILE_IDS:
        with pytest.raises(UnsafeName) as err:
            cropped_path("train", "pho", image_id)
        assert err.value.reason == Reason.BAD_IMAGE_ID


def test_the_crop_export_writes_nothing_for_a_hand_edited_row(tmp_path):
    """CropWorker._export, the one writer of OUT/cropped/: a hostile row gets a reason and no file."""
    from pipeline.crop.worker import CropWorker

    out = tmp_path / "nested" / "run"
    out.mkdir(parents=True)
    worker = object.__new__(CropWorker)  # no ensemble needed to export a crop
    worker.s = SimpleNamespace(out=str(out), export=True, jpeg_quality=90)
    picture = np.zeros((64, 64, 3), dtype=np.uint8)
    box = {"x0": 0, "y0": 0, "x1": 32, "y1": 32}
    before = files_under(tmp_path)
    hostile = [("train", "../../../escape", GOOD_ID, Reason.BAD_LABEL),
               ("train", "x\ny", GOOD_ID, Reason.BAD_LABEL),
               ("../../..", "pho", GOOD_ID, Reason.BAD_SPLIT),
               ("train", "pho", "../../../../escape", Reason.BAD_IMAGE_ID)]  # fmt: skip
    for split, label, image_id, reason in hostile:
        row = pd.Series({"split": split, "label": label, "image_id": image_id})
        assert worker._export(row, picture, box) == {"reason": reason}
    assert files_under(tmp_path) == before
    row = pd.Series({"split": "train", "label": "ramen 🍜", "image_id": GOOD_ID})
    assert worker._export(row, picture, box) == {"path": f"cropped/train/ramen 🍜/{GOOD_ID}.jpg"}
    assert set(files_under(tmp_path)) - set(before) == {f"nested/run/cropped/train/ramen 🍜/{GOOD_ID}.jpg"}


def test_report_heatmap_and_thumbnail_builders_refuse_hostile_names(tmp_path):
    from pipeline.report.heatmaps import HeatJob, heat_name, make_heatmaps
    from pipeline.report.thumbs import make_thumbnails, thumb_name

    assert heat_name(GOOD_ID, "hot dog") == f"heat/{GOOD_ID}/hot dog.png"
    assert thumb_name(GOOD_ID) == f"thumbs/{GOOD_ID}.jpg"
    for label in HOSTILE_LABELS:
        with pytest.raises(UnsafeName):
            heat_name(GOOD_ID, label)
    for image_id in HOSTILE_IDS:
        with pytest.raises(UnsafeName):
            heat_name(image_id, "pho")
        with pytest.raises(UnsafeName):
            thumb_name(image_id)

    out = tmp_path / "a" / "run"
    write(out / "blobs" / "x.jpg", jpeg(0))
    report = str(out / "report")
    before = files_under(tmp_path)
    for job in (
        HeatJob(GOOD_ID, "blobs/x.jpg", ("../../../escape",)),
        HeatJob("../../../x", "blobs/x.jpg", ("pho",)),
    ):
        with pytest.raises(UnsafeName):
            make_heatmaps(str(out), report, [job], ["pho"], ["member"], 1.5, 2.0)
    with pytest.raises(UnsafeName):
        make_thumbnails(str(out), report, [("../../../escape", "blobs/x.jpg")])
    with pytest.raises(storage.UnsafePath):  # a hand-edited path is not read either
        make_thumbnails(str(out), report, [(GOOD_ID, "../../../../etc/hostname")])
    assert files_under(tmp_path) == before
    assert make_thumbnails(str(out), report, [(GOOD_ID, "blobs/x.jpg")]) == 1
    assert set(files_under(tmp_path)) - set(before) == {f"a/run/report/thumbs/{GOOD_ID}.jpg"}


# ---------------------------------------------------------------------------------------- end to end

GOOD_CLASSES = ["pho", "crème_brûlée", "ramen 🍜"]
HOSTILE_ROWS = ["../../escape", "a/b", "..", "x\ny", "/abs", "\x1b[31m", "a::b"]


def test_url_list_with_hostile_labels_writes_nothing_outside_out(ray_local, tmp_path):
    """A URL list whose relative entries are real pictures: every hostile label is a rejected bad_label
    row (bad split: bad_split), the good classes go through, and the only new files are under OUT."""
    from pipeline.ingest import run_ingest
    from tests.conftest import ingest_config

    src = tmp_path / "deep" / "src"
    out = tmp_path / "deep" / "run"
    rows, seed = [], 0
    for label in GOOD_CLASSES:
        for _ in range(4):
            write(src / "img" / f"{seed}.jpg", jpeg(seed))
            rows.append({"url": f"img/{seed}.jpg", "label": label, "split": None})
            seed += 1
    for label in HOSTILE_ROWS:  # real pictures: only the label keeps them out
        write(src / "img" / f"{seed}.jpg", jpeg(seed))
        rows.append({"url": f"img/{seed}.jpg", "label": label, "split": None})
        seed += 1
    write(src / "img" / f"{seed}.jpg", jpeg(seed))
    rows.append({"url": f"img/{seed}.jpg", "label": "pho", "split": "../../x"})
    pd.DataFrame(rows).to_csv(src / "list.csv", index=False)
    before = files_under(tmp_path)

    run_ingest(ingest_config(src / "list.csv", out, "balance.min_per_class=0"))

    after = files_under(tmp_path)
    new = set(after) - set(before)
    assert new and all(p.startswith("deep/run/") for p in new), sorted(
        p for p in new if not p.startswith("deep/run/")
    )
    assert {p: after[p] for p in before} == before  # the source folder (and all else) untouched

    images = manifests.read_manifest("images", str(out / "manifests" / "images.parquet"))
    by_key = images.set_index("source_key")
    assert len(images) == len(rows)
    for i, row in enumerate(rows):
        got = by_key.loc[row["url"]]
        if row["label"] in HOSTILE_ROWS:
            assert (got["status"], got["reason"]) == ("rejected", "bad_label"), row
            assert pd.isna(got["label"]) and repr(row["label"]) in got["detail"]
        elif row["split"]:
            assert (got["status"], got["reason"], got["label"]) == ("rejected", "bad_split", "pho")
            assert "'../../x'" in got["detail"] and pd.isna(got["split"])
        else:
            assert got["status"] == "ok" and got["label"] == row["label"], (i, got.to_dict())
    ok = images[images["status"] == "ok"]
    assert sorted(ok["label"].unique()) == sorted(GOOD_CLASSES) and len(ok) == 12
    assert set(ok["split"]) <= {"train", "val", "test"}
    assert images["label"].dropna().map(label_problem).isna().all()  # no bad label anywhere
    assert images["split"].dropna().map(split_problem).isna().all()
