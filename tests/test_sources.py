"""Sources: Food-101 layout, ImageFolder (with and without split folders), URL lists; odd file names."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline import storage
from pipeline.config import SourceConfig
from pipeline.sources import SourceError, decode_locator, detect_kind, iter_candidates


def jpeg(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (80, 80), (seed * 40 % 256, 100, 150)).save(buf, format="JPEG")
    return buf.getvalue()


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def cands(uri: str | Path, kind: str = "auto") -> list:
    return list(iter_candidates(SourceConfig(uri=str(uri), kind=kind)))


def test_food101_uses_meta_split_and_relative_keys(tmp_path):
    for c in ("pho", "ramen"):
        for i in range(3):
            write(tmp_path / "images" / c / f"{i}.jpg", jpeg(i))
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "train.txt").write_text("pho/0\npho/1\nramen/0\nramen/1\n")
    (tmp_path / "meta" / "test.txt").write_text("pho/2\nramen/2\nramen/9\n")  # ramen/9 is listed, not on disk
    assert detect_kind(str(tmp_path)) == "food101"
    out = cands(tmp_path)
    assert [(c.source_key, c.label, c.split) for c in out][:2] == [
        ("images/pho/0.jpg", "pho", "train"),
        ("images/pho/1.jpg", "pho", "train"),
    ]
    assert {c.split for c in out if c.source_key.endswith("2.jpg")} == {"test"}
    assert len(out) == 7 and all(c.source == "food101" for c in out)
    assert decode_locator(out[0].locator) == str(tmp_path / "images/pho/0.jpg")


def test_food101_without_meta_is_an_error(tmp_path):
    with pytest.raises(SourceError, match="not a Food-101 layout"):
        cands(tmp_path, "food101")


def test_imagefolder_flat_and_with_split_dirs(tmp_path):
    flat = tmp_path / "flat"
    write(flat / "cat" / "a.jpg", jpeg())
    write(flat / "cat" / "sub" / "b.PNG", jpeg())
    write(flat / "dog" / "c.jpeg", jpeg())
    write(flat / "dog" / ".DS_Store", b"x")
    write(flat / "dog" / "notes.txt", b"x")
    out = cands(flat)
    assert [(c.source_key, c.label, c.split) for c in out] == [
        ("cat/a.jpg", "cat", None),
        ("cat/sub/b.PNG", "cat", None),
        ("dog/c.jpeg", "dog", None),
    ]

    split = tmp_path / "split"
    write(split / "train" / "cat" / "a.jpg", jpeg())
    write(split / "val" / "cat" / "b.jpg", jpeg())
    write(split / "test" / "dog" / "c.jpg", jpeg())
    assert {(c.source_key, c.label, c.split) for c in cands(split)} == {
        ("train/cat/a.jpg", "cat", "train"),
        ("val/cat/b.jpg", "cat", "val"),
        ("test/dog/c.jpg", "dog", "test"),
    }


def test_non_utf8_and_traversal_looking_names(tmp_path):
    root = tmp_path / "odd"
    write(root / "cat" / "ok.jpg", jpeg())
    bad = os.fsencode(str(root / "cat")) + b"/caf\xe9-latin1.jpg"  # not valid UTF-8
    with open(bad, "wb") as fh:
        fh.write(jpeg(1))
    write(root / "cat" / "..%2F..%2Fetc%2Fpasswd.jpg", jpeg(2))
    write(root / "cat" / "-rf ;rm.jpg", jpeg(3))
    write(root / "cat" / "a b#c?.jpg", jpeg(4))
    out = cands(root)
    keys = sorted(c.source_key for c in out)
    assert "cat/caf\\xe9-latin1.jpg" in keys  # stored escaped, still valid text
    assert "cat/..%2F..%2Fetc%2Fpasswd.jpg" in keys and "cat/-rf ;rm.jpg" in keys
    by_key = {c.source_key: c for c in out}
    assert Path(decode_locator(by_key["cat/caf\\xe9-latin1.jpg"].locator)).read_bytes() == jpeg(1)
    # The storage layer reads every one of them back by its locator.
    for i, key in enumerate(
        ["cat/caf\\xe9-latin1.jpg", "cat/..%2F..%2Fetc%2Fpasswd.jpg", "cat/-rf ;rm.jpg", "cat/a b#c?.jpg"],
        start=1,
    ):
        assert storage.read_bytes(decode_locator(by_key[key].locator)) == jpeg(i)


def test_url_lists_in_three_formats(tmp_path):
    write(tmp_path / "imgs" / "a.jpg", jpeg())
    (tmp_path / "list.txt").write_text("# comment\nimgs/a.jpg,pho\nhttps://example.org/x.jpg\n\n")
    out = cands(tmp_path / "list.txt")
    assert [(c.source_key, c.label, c.url) for c in out] == [
        ("imgs/a.jpg", "pho", None),
        ("https://example.org/x.jpg", None, "https://example.org/x.jpg"),
    ]
    assert decode_locator(out[0].locator) == str(tmp_path / "imgs" / "a.jpg")

    pd.DataFrame(
        {"url": ["imgs/a.jpg", "imgs/a.jpg"], "label": ["pho", "pho"], "split": ["test", "test"]}
    ).to_csv(tmp_path / "list.csv", index=False)
    out = cands(tmp_path / "list.csv")
    assert len(out) == 1 and out[0].split == "test"  # repeated entries count once

    pd.DataFrame({"url": [str(tmp_path / "imgs" / "a.jpg")], "label": ["ramen"]}).to_parquet(
        tmp_path / "l.parquet"
    )
    assert cands(tmp_path / "l.parquet")[0].label == "ramen"

    pd.DataFrame({"link": ["x"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(SourceError, match="needs a 'url' column"):
        cands(tmp_path / "bad.csv")
