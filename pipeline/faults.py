"""Deliberate failures for resume and fault-tolerance tests.

``CROPCLEAN_FAIL_SHARDS="dedupe:2,normalize:0"`` makes those shards raise every time they run, as a
crashed or poisoned shard would. ``CROPCLEAN_KILL="train:resnet18@1"`` ends a training worker's process
abruptly, once, in the middle of that epoch (an epoch equal to the number of epochs: while it
predicts). Read on the driver and passed to tasks, so they reach every node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

ENV_VAR = "CROPCLEAN_FAIL_SHARDS"
KILL_VAR = "CROPCLEAN_KILL"


class InjectedFailure(RuntimeError):
    pass


@dataclass(frozen=True)
class FaultPlan:
    failing: frozenset[tuple[str, int]] = field(default_factory=frozenset)
    kills: frozenset[tuple[str, int]] = field(default_factory=frozenset)  # (what, epoch)

    @classmethod
    def from_env(cls) -> FaultPlan:
        items = set()
        for part in filter(None, (p.strip() for p in os.environ.get(ENV_VAR, "").split(","))):
            stage, _, shard = part.partition(":")
            items.add((stage, int(shard)))
        kills = set()
        for part in filter(None, (p.strip() for p in os.environ.get(KILL_VAR, "").split(","))):
            what, _, epoch = part.rpartition("@")
            kills.add((what, int(epoch)))
        return cls(frozenset(items), frozenset(kills))

    def kill_epochs(self, what: str) -> list[int]:
        return sorted(epoch for name, epoch in self.kills if name == what)

    def check(self, stage: str, shard: int) -> None:
        if (stage, shard) in self.failing:
            raise InjectedFailure(f"injected failure in {stage} shard {shard} ({ENV_VAR})")
