"""Sources: Food-101 layout, ImageFolder (with and without split folders), URL lists; odd file names."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline import storage
from pipeline.config import SourceConfig, build_config
from pipeline.imaging import NormalizeParams
from pipeline.reasons import Reason, Status
from pipeline.sources import SourceError, decode_locator, detect_kind, encode_locator, iter_candidates
from pipeline.sources.locators import inside, source_roots
from pipeline.stages.normalize import process_candidate
from tests.servers.hostile import ImageServer


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

    pd.DataFrame({"url": ["imgs/a.jpg", None], "label": ["ramen", "pho"]}).to_parquet(tmp_path / "l.parquet")
    out = cands(tmp_path / "l.parquet")
    assert [(c.label, c.reason) for c in out] == [("ramen", None)]  # an empty cell is no entry

    pd.DataFrame({"link": ["x"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(SourceError, match="needs a 'url' column"):
        cands(tmp_path / "bad.csv")


def test_url_list_entries_outside_the_list_folder_are_refused_unopened(tmp_path):
    lists = tmp_path / "lists"
    write(lists / "imgs" / "a.jpg", jpeg())
    write(tmp_path / "secret.jpg", jpeg(9))
    refused = [
        "simplecache::http://127.0.0.2:9/img/secret.jpg",
        "file:///etc/hostname",
        "/etc/hostname",
        "../../../../etc/hostname",
        "../secret.jpg",
        f"file://{tmp_path}/secret.jpg",
        str(tmp_path / "secret.jpg"),
        "imgs/../../secret.jpg",
        "memory://x/a.jpg",
        "s3://bucket/a.jpg",
        "data:image/jpeg;base64,AAAA",
        "C:\\Windows\\win.ini",
        "~/secret.jpg",
        "imgs/a.jpg::memory://x",
        ".",
    ]
    accepted = ["imgs/a.jpg", "imgs/sub/../a2.jpg", "./imgs/./a3.jpg", "http://example.org/x.jpg",
                "HTTPS://example.org/y.jpg", "http://host:99999/x.jpg"]  # fmt: skip
    pd.DataFrame({"url": refused + accepted, "label": "pho"}).to_csv(lists / "urls.csv", index=False)
    out = {c.source_key: c for c in cands(lists / "urls.csv")}
    assert set(out) == set(refused + accepted)
    for entry in refused:
        c = out[entry]
        assert c.reason == Reason.UNSUPPORTED_URL and c.detail and c.url is None, entry
        assert c.label == "pho"  # the row still says which class it was meant for
    assert decode_locator(out["imgs/sub/../a2.jpg"].locator) == str(lists / "imgs" / "a2.jpg")
    assert decode_locator(out["./imgs/./a3.jpg"].locator) == str(lists / "imgs" / "a3.jpg")
    for url in accepted[3:]:  # http(s), malformed or not: the guarded fetcher's to judge
        assert out[url].reason is None and out[url].url == url and decode_locator(out[url].locator) == url


def test_url_list_on_another_filesystem_resolves_entries_with_its_protocol():
    storage.write_bytes_atomic("memory://lists-test/imgs/a.jpg", jpeg())
    storage.write_text_atomic("memory://lists-test/urls.txt", "imgs/a.jpg,pho\n../other/b.jpg,pho\n")
    out = cands("memory://lists-test/urls.txt", kind="urllist")
    assert decode_locator(out[0].locator) == "memory://lists-test/imgs/a.jpg" and out[0].reason is None
    assert out[1].reason == Reason.UNSUPPORTED_URL


def test_url_list_that_cannot_be_read_is_a_source_error(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9.jpg,pho\n")
    with pytest.raises(SourceError, match="cannot read the URL list"):
        cands(tmp_path / "bad.txt")


def test_food101_meta_lines_that_leave_the_images_folder_are_refused(tmp_path):
    write(tmp_path / "images" / "pho" / "0.jpg", jpeg())
    write(tmp_path / "x.jpg", jpeg(1))
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "train.txt").write_text("pho/0\n../x\n../../../etc/x\n/etc/x\npho/a::memory://y\n")
    out = cands(tmp_path)
    assert [(c.source_key, c.label, c.reason) for c in out] == [
        ("images/pho/0.jpg", "pho", None),
        ("images/../x.jpg", None, Reason.UNSUPPORTED_URL),
        ("images/../../../etc/x.jpg", None, Reason.UNSUPPORTED_URL),
        ("images//etc/x.jpg", None, Reason.UNSUPPORTED_URL),
        ("images/pho/a::memory://y.jpg", None, Reason.UNSUPPORTED_URL),
    ]


def test_imagefolder_names_with_a_protocol_chain_are_refused(tmp_path):
    write(tmp_path / "cat" / "a.jpg", jpeg())
    write(tmp_path / "cat" / "a::b.jpg", jpeg(1))  # fsspec would open cat/a instead
    out = {c.source_key: c for c in cands(tmp_path)}
    assert out["cat/a.jpg"].reason is None
    assert out["cat/a::b.jpg"].reason == Reason.UNSUPPORTED_URL


def candidate(locator: str, source: str = "urllist") -> dict:
    return {"image_id": "x", "source": source, "source_key": locator, "locator": encode_locator(locator)}


def test_normalize_reads_only_http_and_paths_inside_the_source_folders(tmp_path):
    # Defence in depth: even a candidate no source refused is opened only when allowed.
    root = tmp_path / "data"
    write(root / "a.jpg", jpeg())
    write(tmp_path / "datax" / "b.jpg", jpeg(1))
    write(tmp_path / "secret.jpg", jpeg(2))
    roots = (str(root),)
    params = NormalizeParams(min_side=16)
    with ImageServer(host="127.0.0.2") as other:
        for locator in [
            f"simplecache::http://127.0.0.2:{other.port}/img/secret.jpg",
            f"simplecache::{root}/a.jpg",
            "file:///etc/hostname",
            "/etc/hostname",
            str(tmp_path / "secret.jpg"),
            f"{root}/../secret.jpg",
            f"{root}/sub/../a.jpg",  # inside on paper, but '..' is resolved after symbolic links
            str(tmp_path / "datax" / "b.jpg"),  # a sibling whose name starts like the root
            f"memory://{root}/a.jpg",
            "data:image/jpeg;base64,AAAA",
        ]:
            row = process_candidate(candidate(locator), params, 2**20, str(tmp_path / "out"), roots=roots)
            assert (row["status"], row["reason"]) == (Status.REJECTED, Reason.UNSUPPORTED_URL), locator
            assert row.get("bytes") is None
        assert sum(other.hits.values()) == 0
    for locator in [str(root / "a.jpg"), f"{root}/./a.jpg", f"file://{root}/a.jpg"]:
        row = process_candidate(candidate(locator), params, 2**20, str(tmp_path / "out"), roots=roots)
        assert row["status"] == Status.OK, (locator, row)
    # No roots (a search source): only http(s) would be read.
    row = process_candidate(candidate(str(root / "a.jpg")), params, 2**20, str(tmp_path / "out"))
    assert row["reason"] == Reason.UNSUPPORTED_URL
    assert inside("s3://bucket/dir/a.jpg", "s3://bucket/dir") and not inside("s3://bucket/dir/a.jpg", "/dir")


def test_the_allowed_folders_come_from_the_sources_config(tmp_path):
    write(tmp_path / "folder" / "cat" / "a.jpg", jpeg())
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "urls.txt").write_text("x.jpg\n")
    out = tmp_path / "run"
    sources = [
        {"uri": str(tmp_path / "folder"), "name": "mine"},
        {"uri": str(tmp_path / "lists" / "urls.txt")},
        {"kind": "search", "classes": ["pho"]},
    ]
    cfg = build_config({"out": str(out), "sources": sources}, preset="cpu-small")
    roots = source_roots(cfg.sources)
    assert roots == {"mine": (str(tmp_path / "folder"),), "urllist": (str(tmp_path / "lists"),)}
