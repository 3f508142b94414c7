"""Shared fixtures: one real local Ray instance per test session, generated datasets with ground truth."""

from __future__ import annotations

from pathlib import Path

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
