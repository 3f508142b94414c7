"""The small shape every stage has: a name, the config it depends on, and ``run``, which returns a
:class:`StageResult`."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.config import RunConfig
from pipeline.faults import FaultPlan
from pipeline.layout import RunLayout
from pipeline.resume import KeyedFolder


@dataclass
class RunContext:
    """What a stage may touch: the config, the run's output URI, and its own folder under ``OUT/stages``."""

    cfg: RunConfig
    faults: FaultPlan = field(default_factory=FaultPlan)
    keys: dict[str, str] = field(default_factory=dict)  # stage name -> completion key of this run

    @property
    def out(self) -> str:
        return self.cfg.out

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.cfg.out)

    def stage_dir(self, stage: str) -> str:
        return self.layout.stage_dir(stage)

    def manifest(self, name: str) -> str:
        return self.layout.manifest(name)

    def parts(self, stage: str) -> KeyedFolder:
        """The folder of a stage's finished parts under this run's key of the stage (``shards-<key>``):
        a config change never reuses stale ones."""
        key = self.keys.get(stage, "-")
        return KeyedFolder.named(self.stage_dir(stage), "shards", key)


def drain(ds: Any) -> None:
    """Run a Ray Dataset whose work is its side effects (shard and part files), dropping its outputs as
    they arrive. ``materialize()`` would keep every output block until the end, and a node lost late in
    a stage would then make Ray re-run the finished tasks whose blocks it held; drained, only the work
    in flight on the lost node runs again."""
    for _ in ds.iter_internal_ref_bundles():
        pass


@dataclass
class StageResult:
    """What a stage's run gave. The runner reads every field but ``stats``: it records them in the
    stage's completion marker, merges ``metrics`` into ``OUT/metrics.json`` (one section per key,
    replaced whole), and chains ``fingerprint`` into the keys of the stages after it."""

    stats: dict[str, Any] = field(default_factory=dict)  # counts for the console and the marker
    fingerprint: str = ""  # of the output: a later stage re-runs when it changes, even if its config did not
    incomplete: bool = False  # work is left for a later run (downloads to retry, a provider that stopped)
    retry_later: int = 0  # how many items that later run takes up
    errors: list[str] = field(default_factory=list)  # one line each, for the console
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # metrics.json sections
    seconds: float = 0.0  # set by the runner
    skipped: bool = False  # set by the runner: complete already, not run


class Stage(ABC):
    name: ClassVar[str]
    # Config sections whose values decide the stage's output (the completion marker hashes them).
    config_sections: ClassVar[tuple[str, ...]] = ()

    def config_key(self, cfg: RunConfig) -> str:
        return cfg.section_hash(*self.config_sections) if self.config_sections else "-"

    @abstractmethod
    def run(self, ctx: RunContext) -> StageResult:
        """Do the work, write the stage's outputs atomically, return what it gave."""

    def timed_run(self, ctx: RunContext) -> StageResult:
        start = time.perf_counter()
        result = self.run(ctx)
        result.seconds = time.perf_counter() - start
        return result
