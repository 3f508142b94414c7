"""Run config: validation errors name the key and what is allowed; presets; --set; CLI exit codes."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import ConfigError, apply_set, build_config, presets

BASE = {"out": "/tmp/x", "sources": [{"uri": "/data"}]}


def test_defaults_and_preset_layering():
    cfg = build_config(dict(BASE), preset="cpu-small", sets=["dedupe.radius=8", "normalize.upscale=true"])
    assert cfg.normalize.target_side == 128  # from the preset
    assert cfg.dedupe.radius == 8 and cfg.normalize.upscale is True  # from --set, typed by YAML
    assert cfg.normalize.jpeg_quality == 90  # default
    assert {"cpu-small", "food101"} <= set(presets())


def test_unknown_top_level_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        build_config({**BASE, "dedup": {"radius": 3}})
    msg = str(err.value)
    assert "unknown key 'dedup'" in msg and "did you mean 'dedupe'" in msg
    for allowed in ("balance", "dedupe", "normalize", "out", "ray", "sources", "split"):
        assert allowed in msg


def test_unknown_nested_key_lists_that_sections_keys():
    with pytest.raises(ConfigError) as err:
        build_config({**BASE, "normalize": {"min_sid": 10}})
    msg = str(err.value)
    assert "normalize.min_sid" in msg and "did you mean 'min_side'" in msg
    assert "max_pixels" in msg and "target_side" in msg and "radius" not in msg


def test_unknown_key_inside_list_item():
    with pytest.raises(ConfigError) as err:
        build_config({"out": "/x", "sources": [{"uri": "/d", "kindd": "food101"}]})
    assert "sources.0.kindd" in str(err.value) and "uri" in str(err.value)


def test_wrong_type_names_field_and_expected_type():
    with pytest.raises(ConfigError) as err:
        build_config({**BASE, "dedupe": {"radius": "ten"}})
    assert "dedupe.radius: expected an integer, got 'ten'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_config({**BASE, "normalize": {"upscale": "maybe"}})
    assert "normalize.upscale: expected true or false" in str(err.value)


def test_bad_enum_value_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        build_config({**BASE, "normalize": {"resize_side": "wide"}})
    msg = str(err.value)
    assert "normalize.resize_side" in msg and "'short'" in msg and "'long'" in msg


def test_range_and_cross_field_checks():
    with pytest.raises(ConfigError, match="jpeg_quality"):
        build_config({**BASE, "normalize": {"jpeg_quality": 0}})
    with pytest.raises(ConfigError, match="must be 1"):
        build_config({**BASE, "split": {"train": 0.9, "val": 0.1, "test": 0.1}})
    with pytest.raises(ConfigError, match="required key is missing"):
        build_config({"sources": [{"uri": "/d"}]})
    with pytest.raises(ConfigError, match="inception_v3 needs at least 75, got 64"):
        build_config({**BASE, "train": {"members": [{"arch": "inception_v3", "input_size": 64}]}})


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError) as err:
        build_config(dict(BASE), preset="gpu-huge")
    assert "gpu-huge" in str(err.value) and "cpu-small" in str(err.value)


def test_set_parses_values_and_indexes_lists():
    doc = apply_set(BASE, "sources.0.kind=food101")
    assert doc["sources"][0]["kind"] == "food101" and BASE["sources"][0] == {"uri": "/data"}
    assert apply_set(BASE, "split.salt=abc")["split"]["salt"] == "abc"
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_set(BASE, "dedupe.radius")
    with pytest.raises(ConfigError, match="no index"):
        apply_set(BASE, "sources.3.uri=/x")


def test_section_hash_tracks_only_its_sections():
    a = build_config(dict(BASE))
    b = build_config(dict(BASE), sets=["dedupe.radius=5"])
    assert a.section_hash("normalize") == b.section_hash("normalize")
    assert a.section_hash("dedupe") != b.section_hash("dedupe")


def test_scheduling_settings_and_later_settings_at_their_old_value_keep_the_keys():
    """normalize.task_cpus changes how downloads are scheduled, not what they give: the normalize key (and
    its per-URL ledger) stays. normalize.resample came later: at its default, runs made before it keep
    their keys and finished downloads; set to another filter, the images change and so does the key."""
    doc = {"sources": [{"uri": "/data"}], "out": "/out"}
    base = build_config(doc, preset="cpu-small")
    assert build_config(doc, preset="cpu-small", sets=["normalize.task_cpus=0.5"]).section_hash("normalize") \
        == base.section_hash("normalize")  # fmt: skip
    assert build_config(doc, preset="cpu-small", sets=["normalize.resample=bicubic"]).section_hash(
        "normalize"
    ) != base.section_hash("normalize")
    before = base.normalize.model_dump(mode="json", exclude={"task_cpus", "resample"})  # as hashed before
    digest = hashlib.sha256(json.dumps({"normalize": before}, sort_keys=True).encode()).hexdigest()[:16]
    assert base.section_hash("normalize") == digest


def test_cli_validate(tmp_path, capsys):
    good = tmp_path / "run.yaml"
    good.write_text(yaml.safe_dump({**BASE, "preset": "cpu-small"}))
    assert main(["validate", str(good), "--show"]) == 0
    assert "target_side: 128" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "dedupe": {"radious": 3}}))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "dedupe.radious" in err and "radius" in err

    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    notyaml = tmp_path / "list.yaml"
    notyaml.write_text("- a\n- b\n")
    assert main(["validate", str(notyaml)]) == 2


def test_config_reference_doc_is_current():
    from pathlib import Path

    from pipeline.config import reference_markdown

    doc = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    assert doc.read_text() == reference_markdown(), "regenerate: python -m pipeline.config > docs/config.md"


def test_local_paths_become_absolute_since_ray_workers_run_elsewhere(tmp_path, monkeypatch):
    # Ray Train workers run in their own directories: a relative OUT would scatter files there.
    monkeypatch.chdir(tmp_path)
    members = [{"arch": "resnet18", "weights": "w/r18.pth"}, {"arch": "resnet50", "weights": "DEFAULT"}]
    sources = [{"uri": "data"}, {"uri": "s3://b/urls.csv", "name": "web"}]
    doc = {"out": "runs/r1", "sources": sources, "train": {"members": members}}
    cfg = build_config(doc)
    assert cfg.out == str(tmp_path / "runs" / "r1")
    assert [s.uri for s in cfg.sources] == [str(tmp_path / "data"), "s3://b/urls.csv"]
    assert [m.weights for m in cfg.train.members] == [str(tmp_path / "w" / "r18.pth"), "DEFAULT"]


def test_cropclean_run_goes_as_far_as_the_config_s_own_sections_ask():
    """A preset's sections do not count; every pipeline is the full one's stages in its order."""
    from pipeline.pipelines import PIPELINES, STAGES, pipeline_for

    doc = {"sources": [{"uri": "/data"}], "out": "/out", "preset": "cpu-small"}
    assert pipeline_for(doc) == "ingest"
    assert pipeline_for(doc | {"train": {"folds": 2}}) == "train"
    assert pipeline_for(doc | {"train": {}, "blacklist": {"max_votes": 1}}) == "crop"
    assert pipeline_for(doc | {"crop": {}}) == "crop"
    assert pipeline_for(doc | {"crop": {}, "evaluate": {}}) == "clean"
    full = PIPELINES["clean"]
    assert set(full) == set(STAGES) and full[-1] == "report"
    for order in PIPELINES.values():
        assert [s for s in full if s in order] == list(order)
