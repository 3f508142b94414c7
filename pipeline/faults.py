"""Deliberate failures for resume and fault-tolerance tests.

``CROPCLEAN_FAIL_SHARDS="dedupe:2,normalize:0"`` makes those shards raise every time they run, as a
crashed or poisoned shard would. Read on the driver and passed to tasks, so it reaches every node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

ENV_VAR = "CROPCLEAN_FAIL_SHARDS"


class InjectedFailure(RuntimeError):
    pass


@dataclass(frozen=True)
class FaultPlan:
    failing: frozenset[tuple[str, int]] = field(default_factory=frozenset)

    @classmethod
    def from_env(cls) -> FaultPlan:
        spec = os.environ.get(ENV_VAR, "").strip()
        items = set()
        for part in filter(None, (p.strip() for p in spec.split(","))):
            stage, _, shard = part.partition(":")
            items.add((stage, int(shard)))
        return cls(frozenset(items))

    def check(self, stage: str, shard: int) -> None:
        if (stage, shard) in self.failing:
            raise InjectedFailure(f"injected failure in {stage} shard {shard} ({ENV_VAR})")
