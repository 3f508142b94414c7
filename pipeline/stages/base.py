"""The small shape every stage has: a name, the config it depends on, resources, and ``run``."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline import storage
from pipeline.config import RunConfig
from pipeline.faults import FaultPlan


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0


@dataclass
class RunContext:
    """What a stage may touch: the config, the run's output URI, and its own folder under ``OUT/stages``."""

    cfg: RunConfig
    faults: FaultPlan = field(default_factory=FaultPlan)
    keys: dict[str, str] = field(default_factory=dict)  # stage name -> completion key of this run

    @property
    def out(self) -> str:
        return self.cfg.out

    def uri(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    def stage_dir(self, stage: str) -> str:
        return self.uri("stages", stage)

    def shard_dir(self, stage: str) -> str:
        """Where a stage keeps finished shards; keyed so that a config change never reuses stale ones."""
        return storage.join(self.stage_dir(stage), f"shards-{self.keys.get(stage, '-')}")

    def manifest(self, name: str) -> str:
        return self.uri("manifests", f"{name}.parquet")


def shard_file(shard_dir: str, prefix: str, shard: int) -> str:
    return storage.join(shard_dir, f"{prefix}-{shard:06d}.parquet")


def finished_shards(shard_dir: str, prefix: str) -> set[int]:
    """Numbers of the shards whose output file exists (files are written atomically)."""
    names = (u.rsplit("/", 1)[-1] for u in storage.list_files(shard_dir, ".parquet"))
    return {int(n[len(prefix) + 1 : -len(".parquet")]) for n in names if n.startswith(f"{prefix}-")}


def drain(ds: Any) -> None:
    """Run a Ray Dataset whose work is its side effects (shard and part files), dropping its outputs as
    they arrive. ``materialize()`` would keep every output block until the end, and a node lost late in
    a stage would then make Ray re-run the finished tasks whose blocks it held; drained, only the work
    in flight on the lost node runs again."""
    for _ in ds.iter_internal_ref_bundles():
        pass


@dataclass
class StageResult:
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: bool = False


class Stage(ABC):
    name: ClassVar[str]
    resources: ClassVar[Resources] = Resources()
    # Config sections whose values decide the stage's output (the completion marker hashes them).
    config_sections: ClassVar[tuple[str, ...]] = ()

    def config_key(self, cfg: RunConfig) -> str:
        return cfg.section_hash(*self.config_sections) if self.config_sections else "-"

    @abstractmethod
    def run(self, ctx: RunContext) -> dict[str, Any]:
        """Do the work, write the stage's outputs atomically, return stats for the summary."""

    def timed_run(self, ctx: RunContext) -> StageResult:
        start = time.perf_counter()
        stats = self.run(ctx)
        return StageResult(stats=stats, seconds=time.perf_counter() - start)
