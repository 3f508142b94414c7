"""The installed package on its own: a wheel built from the sources and installed non-editable, run from a
folder outside the repository, finds its schemas, presets and report files and writes valid manifests.

The wheel is built offline with the virtualenv's setuptools (``--no-build-isolation --no-index``) from a
copy of the sources, since a build writes ``build/`` and ``*.egg-info`` into the folder it builds. The
installed copy comes first on PYTHONPATH, ahead of the editable install of the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.manifests import load_schema

REPO = Path(__file__).resolve().parent.parent
# What the build reads: pyproject.toml names README.md as the long description and maps the package
# pipeline.schemas to the top-level schemas/.
SOURCES = ("pyproject.toml", "README.md", "pipeline", "jobs", "schemas")
# The package data that pyproject.toml declares, besides the schemas.
PACKAGE_DATA = ("presets/*.yaml", "report/templates/*.html", "report/assets/*")

# Run by the installed copy: where it was imported from, and its reading of the run's manifests (each
# read checks the schema name and major version stored in the file).
CHECK = """
import json, sys
import pipeline
from pipeline.manifests import SCHEMA_DIR, read_manifest
out = sys.argv[1]
images = read_manifest("images", out + "/manifests/images.parquet")
dups = read_manifest("duplicates", out + "/manifests/duplicates.parquet")
print(json.dumps({"package": pipeline.__file__, "schemas": str(SCHEMA_DIR), "images": len(images),
                  "ok": int((images["status"] == "ok").sum()), "duplicate_rows": len(dups)}))
"""


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    major = int(version("setuptools").split(".")[0])
    assert major >= 68, f"the offline build uses the virtualenv's setuptools, {version('setuptools')} < 68"
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip = ["-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", "dist", str(src)], cwd=root)
    (built,) = (root / "dist").glob("cropclean-*.whl")
    return built


def test_the_wheel_holds_every_module_schema_and_package_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    schemas = {f"pipeline/schemas/{p.name}" for p in (REPO / "schemas").glob("*.yaml")}
    assert "pipeline/schemas/images.yaml" in schemas
    data = {
        p.relative_to(REPO).as_posix() for pattern in PACKAGE_DATA for p in (REPO / "pipeline").glob(pattern)
    }
    assert {"pipeline/presets/cpu-small.yaml", "pipeline/presets/food101.yaml"} <= data
    assert {"pipeline/report/templates/index.html", "pipeline/report/assets/report.css"} <= data
    # Every module: pyproject.toml lists the packages, and a package left off the list would be missing.
    modules = {
        p.relative_to(REPO).as_posix()
        for package in ("pipeline", "jobs")
        for p in (REPO / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    missing = sorted((schemas | data | modules) - names)
    assert not missing, f"not in {wheel.name}: {missing} (pyproject.toml's packages or package-data)"
    assert not [n for n in names if n.startswith("schemas/")], "schemas/ must ship inside the package"


def test_the_installed_wheel_validates_ingests_and_reports_outside_the_repo(wheel, tmp_path):
    from pipeline.synth import synthesize

    site, work, data, out = tmp_path / "site", tmp_path / "work", tmp_path / "data", tmp_path / "run"
    assert not tmp_path.resolve().is_relative_to(REPO)
    run(["-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], cwd=tmp_path)
    work.mkdir()
    synthesize(str(data), classes=2, per_class=4, seed=3)
    truth = pd.read_parquet(data / "ground_truth.parquet")
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("RAY_ADDRESS", None)

    config = work / "run.yaml"
    doc = {"sources": [{"uri": str(data)}], "out": str(out), "preset": "cpu-small", "ray": {"num_cpus": 2}}
    config.write_text(yaml.safe_dump(doc))
    validated = run(["-m", "pipeline.cli", "validate", str(config), "--show"], cwd=work, env=env)
    assert validated.stdout.startswith(f"{config}: valid")
    assert "target_side: 128" in validated.stdout  # from the installed cpu-small preset

    cli = ["-m", "pipeline.cli", "ingest", str(data), "--out", str(out), "--preset", "cpu-small"]
    ingested = run([*cli, "--set", "ray.num_cpus=2"], cwd=work, env=env)
    assert "Ingest summary" in ingested.stdout
    # The console is cropclean's: Ray's own lines go to OUT/logs/ray.log, which the run names at the end.
    printed = (ingested.stdout + ingested.stderr).splitlines()
    assert all(line.startswith(("stage ", "warning: ", "note: ")) for line in ingested.stderr.splitlines()), (
        ingested.stderr
    )
    ray_lines = [line for line in printed if "pid=" in line or "(raylet)" in line or "WARNING" in line]
    assert ray_lines == [], ray_lines
    assert f"Ray's log: {out}/logs/ray.log" in ingested.stdout
    assert (out / "logs" / "ray.log").is_file()

    found = json.loads(run(["-c", CHECK, str(out)], cwd=work, env=env).stdout)
    assert Path(found["package"]).resolve().is_relative_to(site.resolve()), found
    assert Path(found["schemas"]).resolve() == (site / "pipeline" / "schemas").resolve(), found
    assert found["images"] == len(truth) and 0 < found["ok"] < found["images"], found
    assert found["duplicate_rows"] > 0, found
    for name in ("images", "duplicates"):  # written with exactly the schema of the checkout's schemas/
        written = pq.read_schema(out / "manifests" / f"{name}.parquet")
        assert written.equals(load_schema(name).arrow_schema(), check_metadata=True), name

    run(["-m", "pipeline.cli", "report", str(out)], cwd=work, env=env)
    assert (out / "report" / "index.html").is_file()
    assets = REPO / "pipeline" / "report" / "assets"
    assert (out / "report" / "report.css").read_bytes() == (assets / "report.css").read_bytes()
