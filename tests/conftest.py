"""Shared fixtures: one real local Ray instance per test session, generated datasets with ground truth, and
the demo's run (``cropclean clean`` with cpu-small, about 7.5 minutes on 2 cores), which the end-to-end
quality tests and the report's browser tests both read."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from pipeline.runner import configure_ray_data

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    configure_ray_data()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """A small generated Food-101-layout dataset (every injected kind present)."""
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize(str(root), classes=5, per_class=24, noise=0.1, seed=7)
    return root


@pytest.fixture(scope="session")
def small_truth(small_dataset) -> pd.DataFrame:
    return pd.read_parquet(small_dataset / "ground_truth.parquet")


def ingest_config(source: Path | str, out: Path | str, *sets: str):
    from pipeline.config import build_config

    return build_config(
        {"sources": [{"uri": str(source)}], "out": str(out)}, preset="cpu-small", sets=list(sets)
    )


@dataclass(frozen=True)
class DemoRun:
    out: Path
    metrics: dict[str, Any]
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def demo_run(ray_local, tmp_path_factory) -> DemoRun:
    """The demo: 8 classes x 60 images (chance 0.125), clutter 0.25, ``cropclean clean`` as a user runs it."""
    from pipeline.cli import main
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("clean")
    data, out = root / "data", root / "run"
    synthesize(str(data), classes=8, per_class=60, clutter=0.25)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert main(["clean", str(data), "--out", str(out), "--preset", "cpu-small"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    return DemoRun(out, metrics, stdout.getvalue(), stderr.getvalue())
