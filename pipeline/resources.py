"""What the stages ask Ray for, planned against the cluster's nodes, not only against its totals.

Ray places every task, actor and Ray Train worker on one node. A request that fits the cluster's total
but no node's free share waits forever, without a message: two half-CPU training workers spread over
two 1-CPU nodes leave half a CPU on each, and a data task asking for a whole CPU never starts. So the
stages plan against the nodes as they are (``alive_nodes``): what holds resources for the whole stage
(training workers, actor pools) is placed first, as Ray may place it, and what is left sizes the short
tasks that feed it (``task_cpus``). What cannot be placed is a one-line ``PlacementError`` naming what
was asked for and what each node has.

The planning functions are pure: nodes and requests in, a placement out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pipeline.config import ConfigError

# The least CPU share a data task is given beside the workers it feeds. Below it, Ray would run many
# tasks on one core at once; the stage stops and says so instead.
MIN_TASK_CPUS = 0.25
EPS = 1e-6  # Ray keeps resources to 1e-4; sums of fractions must not fail on rounding


class PlacementError(ConfigError):
    """What a stage asks for cannot be placed on the cluster's nodes; the message names both."""


@dataclass(frozen=True)
class Node:
    name: str  # its IP address, as `ray status` and the dashboard show it
    cpus: float
    gpus: float = 0.0


@dataclass(frozen=True)
class Request:
    """``count`` units of one shape: ``what`` each is, and the CPUs and GPUs each one holds."""

    what: str
    cpus: float
    gpus: float = 0.0
    count: int = 1

    def shape(self) -> str:
        return amounts(self.cpus, self.gpus)

    def text(self) -> str:
        """``2 x training worker (0.5 CPU each)``."""
        return f"{self.count} x {self.what} ({self.shape()}{' each' if self.count != 1 else ''})"


@dataclass
class Placement:
    """Where the requests went: what each node has left, and the first unit that found no node."""

    nodes: list[Node]
    free_cpus: list[float]
    free_gpus: list[float]
    unplaced: Request | None = None
    on: list[str] = field(default_factory=list)  # the node of each placed unit, in placing order

    @property
    def placed(self) -> bool:
        return self.unplaced is None

    def most_free_cpus(self) -> float:
        return max(self.free_cpus, default=0.0)


def amounts(cpus: float, gpus: float = 0.0) -> str:
    """``0.5 CPU``, ``1 CPU and 1 GPU``."""
    return f"{cpus:g} CPU" + (f" and {gpus:g} GPU" if gpus else "")


def as_nodes(resources: Mapping[str, float] | Sequence[Node]) -> list[Node]:
    """Nodes as given; a mapping of totals (``ray.cluster_resources()``) is taken as one node."""
    if isinstance(resources, Mapping):
        return [Node("cluster", float(resources.get("CPU", 0)), float(resources.get("GPU", 0)))]
    return list(resources)


def alive_nodes() -> list[Node]:
    """The cluster's live nodes and their CPUs and GPUs (``ray.nodes()``); needs a connected driver."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    ips = [n.get("NodeManagerAddress", "?") for n in alive]
    nodes = []
    for n, ip in zip(alive, ips, strict=True):
        # Several nodes on one machine share its address: the node id tells them apart.
        name = ip if ips.count(ip) == 1 else f"{ip} ({str(n.get('NodeID', ''))[:8]})"
        res = n.get("Resources", {})
        nodes.append(Node(name, float(res.get("CPU", 0)), float(res.get("GPU", 0))))
    return sorted(nodes, key=lambda x: x.name)


def describe_nodes(nodes: Sequence[Node]) -> str:
    """``127.0.0.2: 1 CPU; 127.0.0.3: 1 CPU`` (GPUs where a node has them)."""
    if not nodes:
        return "no live nodes"
    return "; ".join(f"{n.name}: {amounts(n.cpus, n.gpus)}" for n in nodes)


def place(nodes: Sequence[Node], requests: Sequence[Request]) -> Placement:
    """Place every unit of ``requests`` on ``nodes``, largest first, each on the node with the most room.

    Most room first is how Ray spreads work once a node is half busy, and it is the worst case for what
    is left: it leaves the least room on the fullest node for what comes next. A unit that fits no
    node's remaining share ends the placement (``unplaced``).
    """
    nodes = list(nodes)
    free_cpus = [n.cpus for n in nodes]
    free_gpus = [n.gpus for n in nodes]
    plan = Placement(nodes, free_cpus, free_gpus)
    units = [r for r in requests for _ in range(r.count)]
    for unit in sorted(units, key=lambda r: (r.gpus, r.cpus), reverse=True):
        fits = [i for i in range(len(nodes))
                if free_cpus[i] + EPS >= unit.cpus and free_gpus[i] + EPS >= unit.gpus]  # fmt: skip
        if not fits:
            plan.unplaced = Request(unit.what, unit.cpus, unit.gpus)
            return plan
        i = max(fits, key=lambda k: (free_gpus[k] if unit.gpus else 0.0, free_cpus[k]))
        free_cpus[i] -= unit.cpus
        free_gpus[i] -= unit.gpus
        plan.on.append(nodes[i].name)
    return plan


def task_cpus(nodes: Sequence[Node], holders: Sequence[Request], want: float = 1.0,
              least: float = MIN_TASK_CPUS) -> float | None:  # fmt: skip
    """The CPUs a short task can ask for once ``holders`` are placed: ``want``, or less where no node has
    that much left (a node with half a CPU free runs half-CPU tasks); None when the holders cannot be
    placed or leave less than ``least`` on every node."""
    plan = place(nodes, holders)
    if not plan.placed:
        return None
    share = min(want, plan.most_free_cpus())
    return round(share, 4) if share + EPS >= min(want, least) else None


def fit_count(nodes: Sequence[Node], cpus: float, gpus: float = 0.0) -> int:
    """How many units of ``cpus`` and ``gpus`` the nodes hold at once (each unit on one node)."""
    total = 0
    for n in nodes:
        by_cpu = int(n.cpus / cpus + EPS) if cpus > 0 else None
        by_gpu = int(n.gpus / gpus + EPS) if gpus > 0 else None
        counts = [c for c in (by_cpu, by_gpu) if c is not None]
        total += min(counts) if counts else 0
    return total


def require_task_cpus(stage: str, nodes: Sequence[Node], want: float = 1.0, setting: str = "") -> float:
    """The CPUs each of a stage's tasks asks for (``want``, or what the largest node has when less);
    fails when no node has a CPU share to give."""
    share = task_cpus(nodes, [], want)
    if share is None:
        raise PlacementError(
            f"{stage}: its tasks need {want:g} CPU{f' ({setting})' if setting else ''} and no node has "
            f"{MIN_TASK_CPUS:g} of one (nodes: {describe_nodes(nodes)}); add a node with CPUs."
        )
    return share
