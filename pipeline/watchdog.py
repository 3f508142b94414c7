"""A stage that waits for resources says so: a driver thread watches Ray's view of the cluster.

Ray leaves a task, actor or placement group that no node has room for pending, without a message, for
as long as the job lives. While a stage runs, a ``Watchdog`` polls the cluster state the autoscaler
reads from the GCS (``ray.autoscaler.v2.sdk.get_cluster_status``, what `ray status` prints: pending
demands, and each node's resources in use). When something has been waiting for ``ray.stall_timeout``
seconds and nothing changed meanwhile (no node's free CPUs, GPUs or object store, no pending demand),
the stage is stuck: it logs one line naming what waits and what each node has free, and with
``ray.stall_fail`` ends the run (exit 1) instead of waiting on.

A stage that is busy (tasks finishing, blocks coming and going in the object store) or waits for
nothing never trips it, however long it runs. Requests for the autoscaler (``request_resources``, which
Ray Train makes for its workers) are not waits and are left out.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("cropclean")

EXIT_FAILED = 1  # as the CLI's: a run that failed, not a bad argument


@dataclass(frozen=True)
class NodeFree:
    """A node's CPUs and GPUs, in all and free, and its free object store bytes (activity shows there)."""

    name: str
    cpus: float
    free_cpus: float
    gpus: float = 0.0
    free_gpus: float = 0.0
    store_free: float = 0.0


@dataclass(frozen=True)
class Demand:
    """``count`` pending requests of one shape: tasks and actors, or a placement group's bundles."""

    kind: str  # "task/actor" | "placement group"
    shape: tuple[tuple[str, float], ...]
    count: int = 1


@dataclass(frozen=True)
class ClusterState:
    nodes: tuple[NodeFree, ...]
    demands: tuple[Demand, ...]


def _shape(bundle: dict[str, float]) -> tuple[tuple[str, float], ...]:
    """A bundle's resources, CPU and GPU first; Ray's per-placement-group and per-node names left out."""
    kept = {k: float(v) for k, v in bundle.items() if "_group_" not in k and not k.startswith("node:")}
    first = [k for k in ("CPU", "GPU") if k in kept]
    return tuple((k, kept[k]) for k in [*first, *sorted(set(kept) - set(first))])


def state_from_status(status: Any) -> ClusterState:
    """A ``ClusterState`` from the autoscaler's ``ClusterStatus`` (``get_cluster_status``)."""
    infos = [*status.active_nodes, *status.idle_nodes]
    ips = [n.ip_address for n in infos]
    nodes = []
    for info, ip in zip(infos, ips, strict=True):
        total, free = info.total_resources(), info.available_resources()
        name = ip if ips.count(ip) == 1 else f"{ip} ({(info.node_id or '')[:8]})"
        nodes.append(NodeFree(name, total.get("CPU", 0.0), free.get("CPU", 0.0), total.get("GPU", 0.0),
                              free.get("GPU", 0.0), free.get("object_store_memory", 0.0)))  # fmt: skip
    demands = []
    summary = status.resource_demands
    for d in summary.ray_task_actor_demand:
        demands += [Demand("task/actor", _shape(b.bundle), b.count) for b in d.bundles_by_count]
    for d in summary.placement_group_demand:
        demands += [Demand("placement group", _shape(b.bundle), b.count) for b in d.bundles_by_count]
    return ClusterState(tuple(sorted(nodes, key=lambda n: n.name)), tuple(demands))


def cluster_state(gcs_address: str) -> ClusterState:
    from ray.autoscaler.v2.sdk import get_cluster_status

    return state_from_status(get_cluster_status(gcs_address, timeout=10))


def _amount(shape: tuple[tuple[str, float], ...]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in shape) + "}"


def stall_message(stage: str, seconds: float, state: ClusterState) -> str:
    """One line: how long the stage has not moved, what waits for which resources, what nodes have free."""
    waits = ", ".join(f"{d.count} x {_amount(d.shape)} ({d.kind})" for d in state.demands) or "nothing"
    gpus = any(n.gpus for n in state.nodes) or any(k == "GPU" for d in state.demands for k, _ in d.shape)
    free = "; ".join(
        f"{n.name}: {n.free_cpus:g} of {n.cpus:g} CPU" + (f", {n.free_gpus:g} of {n.gpus:g} GPU" * gpus)
        for n in state.nodes
    )
    return (
        f"stage {stage}: no progress for {seconds:.0f} s, waiting for resources no node has free: {waits}; "
        f"free per node: {free or 'no live nodes'}. Give the cluster what is missing or ask for less "
        f"(docs/cluster.md, 'Resources that fit the nodes'); ray.stall_timeout sets this wait (0: off), "
        f"ray.stall_fail ends the run."
    )


def fail_run(message: str) -> None:
    """End the driver at once with ``message`` as its last line (exit 1). A stuck stage's threads wait in
    Ray calls that do not return, so no exception would end the run; its finished work is on disk
    (completion markers, shards) and a later run resumes from there."""
    sys.stderr.write(f"cropclean: {message}\n")
    sys.stderr.flush()
    for handler in logging.getLogger().handlers + log.handlers:
        handler.flush()
    os._exit(EXIT_FAILED)


class Watchdog:
    """Watches one stage from a daemon thread (``with Watchdog(...):``); ``check`` is one poll.

    ``probe`` returns the cluster's state (None when it cannot be read: that poll says nothing);
    ``on_stall`` receives the message, by default a warning, or ``fail_run`` when ``fail``.
    """

    def __init__(self, stage: str, timeout: float, fail: bool = False,
                 probe: Callable[[], ClusterState | None] | None = None,
                 on_stall: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.stage, self.timeout, self.clock = stage, float(timeout), clock
        self.probe = probe
        self.on_stall = on_stall or (fail_run if fail else log.warning)
        # Often enough to notice within a tenth of the timeout; never more than once a second.
        self.interval = max(1.0, min(30.0, self.timeout / 10))
        self._last: ClusterState | None = None
        self._since = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> str | None:
        """Take one look; the message when something has waited ``timeout`` seconds with nothing moving."""
        try:
            state = self.probe() if self.probe else None
        except Exception as exc:  # a busy or restarting GCS: this poll says nothing
            log.debug("stall watchdog: cluster state not read: %s", exc)
            return None
        if state is None:
            return None
        now = self.clock()
        if state != self._last or not state.demands:
            self._last, self._since = state, now
            return None
        waited = now - self._since
        if waited < self.timeout:
            return None
        self._since = now  # the next warning after another full timeout, not at every poll
        return stall_message(self.stage, waited, state)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            message = self.check()
            if message:
                self.on_stall(message)

    def __enter__(self) -> Watchdog:
        if self.timeout > 0:
            if self.probe is None:
                self.probe = _ray_probe()
            self._since = self.clock()
            name = f"stall-watchdog-{self.stage}"
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _ray_probe() -> Callable[[], ClusterState | None]:
    """Reads the state of the cluster this driver is connected to (its GCS address, taken now)."""
    import ray

    if not ray.is_initialized():
        return lambda: None
    address = ray.get_runtime_context().gcs_address
    return lambda: cluster_state(address)
