"""Actor pools and GPU use: one place for how a stage that keeps models in memory runs them on Ray Data.

The crop stage and ``cropclean predict`` both hold an ensemble in each actor of a pool and feed it
batches of images of one size; the pool's size, its CPUs and GPUs per actor and whether a GPU is used
all come from the ``crop`` section, decided here for both.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from pipeline.config import CropConfig
from pipeline.resources import Node, PlacementError, Request, alive_nodes, as_nodes, describe_nodes, fit_count

log = logging.getLogger("cropclean")


def use_gpu(choice: str) -> bool:
    """A ``use_gpu`` setting (yes | no | auto) against the cluster: auto uses one when Ray has any."""
    import ray

    return choice == "yes" or (choice == "auto" and ray.cluster_resources().get("GPU", 0) > 0)


def default_actors(c: CropConfig, resources: Mapping[str, float] | Sequence[Node], gpu: bool) -> int:
    """As many actors as the nodes hold: on a GPU cluster each node's GPUs over ``gpus_per_actor`` (as far
    as its CPUs hold ``cpus_per_actor`` each), else its CPUs over ``cpus_per_actor``, summed over the
    nodes (an actor lives on one node: 1.5 CPUs on one and 0.5 on another hold one 1-CPU actor, not
    two). The stage runs alone, and its input is in memory: no read tasks. 0 when no node holds one. A
    mapping of totals (``ray.cluster_resources()``) is taken as one node."""
    return fit_count(as_nodes(resources), c.cpus_per_actor, c.gpus_per_actor if gpu else 0.0)


def pool_size(c: CropConfig, nodes: Sequence[Node], gpu: bool, stage: str = "crop") -> int:
    """The actor pool's size: ``crop.actors``, or as many as the nodes hold; fails at once when no node
    holds one actor, and starts only as many as fit when ``crop.actors`` asks for more (the others would
    wait for a node forever)."""
    fit = default_actors(c, nodes, gpu)
    actor = Request("actor", c.cpus_per_actor, c.gpus_per_actor if gpu else 0.0)
    if fit == 0:
        settings = "crop.cpus_per_actor" + (", crop.gpus_per_actor" if gpu else "")
        raise PlacementError(
            f"{stage}: an actor of {actor.shape()} ({settings}) fits on no node "
            f"({describe_nodes(nodes)}). Lower {settings}, or add a node that large."
        )
    if c.actors and c.actors > fit:
        log.warning("%s: crop.actors is %d but the nodes hold %d of %s (%s); starting %d", stage, c.actors,
                    fit, actor.shape(), describe_nodes(nodes), fit)  # fmt: skip
        return fit
    return c.actors or fit


def batch_blocks(frame: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """One block per batch: Ray Data hands an actor pool whole blocks, so a single block of every row
    would keep all but one actor idle."""
    frame = frame.reset_index(drop=True)
    blocks = [frame.iloc[i : i + batch_size].reset_index(drop=True) for i in range(0, len(frame), batch_size)]
    return blocks or [frame]


def map_with_pool(frame: pd.DataFrame, worker: type, settings: Any, c: CropConfig, stage: str) -> Any:
    """A Ray Dataset that runs ``worker(settings)`` actors over ``frame`` in batches of ``c.batch_size``
    (rows in the order given: sort them so that a batch holds images of one size), on a GPU each when
    ``c.use_gpu`` asks for one and the cluster has it."""
    import ray

    gpu = use_gpu(c.use_gpu)
    blocks = batch_blocks(frame, c.batch_size)
    # No more actors than batches: the others would start (a model load each) and never get work.
    actors = min(pool_size(c, alive_nodes(), gpu, stage), len(blocks))
    return ray.data.from_pandas(blocks).map_batches(
        worker, fn_constructor_kwargs={"settings": settings}, batch_size=c.batch_size,
        batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=c.cpus_per_actor, num_gpus=c.gpus_per_actor if gpu else 0,
    )  # fmt: skip
