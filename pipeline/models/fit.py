"""Training many models on Ray Train: datasets prepared once, a member's models in one Ray Train run,
as many runs at once as the cluster holds, and models finished in an earlier run not trained again.

``fit_all`` is what the train and evaluate stages call; the training loop itself is
``pipeline.models.train_loop``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from typing import Any

import pandas as pd

from pipeline import storage
from pipeline.actor_pool import use_gpu
from pipeline.config import RunConfig
from pipeline.faults import FaultPlan
from pipeline.layout import RunLayout
from pipeline.models.data import Augment, decoded_bytes, ray_dataset
from pipeline.models.jobs import Job, prediction_parts
from pipeline.models.train_loop import part_marker, predictions_dir, train_loop_per_worker
from pipeline.resources import (
    MIN_TASK_CPUS,
    Node,
    PlacementError,
    Request,
    alive_nodes,
    as_nodes,
    describe_nodes,
    place,
    task_cpus,
)
from pipeline.resume import KeyedFolder

log = logging.getLogger("cropclean")


def local_path(uri: str) -> str:
    """Ray Train wants an absolute local path or a URI."""
    return uri if "://" in uri else os.path.abspath(uri)


def augmentation(cfg: RunConfig, crop_min: float | None = None) -> Augment:
    """The training augmentation of ``train``; ``crop_min`` overrides its random resized crops' least area."""
    t = cfg.train
    least = t.augment_crop_min if crop_min is None else crop_min
    return Augment(flip=t.augment_flip, crop_scale=(least, 1.0), color_jitter=t.augment_color)


def augment_of(cache: DatasetCache, job: Job) -> Augment:
    """A job's training augmentation: the cache's, with the member's own least crop area if it sets one."""
    least = job.member.augment_crop_min
    return cache.augment if least is None else replace(cache.augment, crop_scale=(least, 1.0))


class DatasetCache:
    """The Ray Datasets of several trainings, built before any of them starts.

    Started while the cluster is idle, the decoding tasks run at once; started between trainings, they
    wait for the CPUs that the running trainings' data tasks hold (on 2 cores, 40 s and more per
    model). The val set is one dataset per input size, shared by every model that selects on it.
    ``budget`` bounds the bytes the prepared datasets keep decoded in the object store; beyond it, a
    dataset is read afresh by its training, as without the cache.
    """

    def __init__(self, cfg: RunConfig, out: str, augment: Augment | None = None, budget: int = 2**30,
                 task_cpus: float = 1.0) -> None:  # fmt: skip
        self.cfg, self.out, self.budget, self.task_cpus = cfg, out, budget, task_cpus
        self.augment = augment or augmentation(cfg)
        self.shared: dict[tuple[int, int], Any] = {}

    def dataset(self, rows: pd.DataFrame, size: int, augment: Augment | None, share: bool = False) -> Any:
        t = self.cfg.train
        key = (id(rows), size)
        if share and key in self.shared:
            return self.shared[key]
        need = decoded_bytes(len(rows), size, augment)
        ds = ray_dataset(rows, self.out, size, augment, t.batch_size, cache_bytes=self.budget, seed=t.seed,
                         num_cpus=self.task_cpus)  # fmt: skip
        if need <= self.budget:
            self.budget -= need
        if share:
            self.shared[key] = ds
        return ds

    def job(self, job: Job, val_rows: pd.DataFrame) -> dict[str, Any]:
        size = job.params.input_size
        datasets = {
            "train": self.dataset(job.train_rows, size, augment_of(self, job)),
            "val": self.dataset(val_rows, size, None, share=True),
        }
        if not job.predict_rows.empty:
            datasets["predict"] = self.dataset(job.predict_rows, size, None)
        return datasets


def fit_all(
    jobs: list[tuple[Job, pd.DataFrame]], cfg: RunConfig, key: str, stage: str = "train",
    augment: Augment | None = None, faults: FaultPlan | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Train every (job, val rows) pair and predict its rows; returns their results in order.

    As many trainings go at a time as the cluster holds (``concurrency``), and each of those slots is one
    Ray Train run that trains its models one after another (``runs``: a member's full-data and fold
    models together, members beyond the slots spread over them), so a worker group starts once per
    slot, not once per model (on 2 cores that start-up is 16 to 28 s). Their datasets are prepared
    first (``DatasetCache``). Jobs finished
    in an earlier run with the same ``key`` (the calling stage's: its settings and the data it reads)
    are not trained again. ``augment``: the training augmentation, when not ``train``'s.
    """
    nodes, gpu = alive_nodes(), use_gpu(cfg.train.use_gpu)
    check_room(cfg, nodes, gpu)
    results: dict[int, dict[str, Any]] = {}
    todo = []
    for i, (job, _) in enumerate(jobs):
        finished = KeyedFolder(job.params.model_dir, key).done()
        if finished is None:
            todo.append(i)
        else:
            results[i] = finished
    members: dict[str, list[int]] = {}
    for i in todo:
        members.setdefault(jobs[i][0].params.member, []).append(i)
    at_once = concurrency(cfg, max(1, len(members)), nodes, gpu)  # checked before any decoding
    share = data_cpus(cfg, at_once, nodes, gpu) or MIN_TASK_CPUS
    log.info("%s: %d training(s) at once; data tasks ask for %g CPU (nodes: %s)", stage, at_once, share,
             describe_nodes(nodes))  # fmt: skip
    cache = DatasetCache(cfg, cfg.out, augment, task_cpus=share)
    prepared = {i: (jobs[i][0], cache.job(*jobs[i]), augment_of(cache, jobs[i][0])) for i in todo}
    groups = runs(list(members.values()), at_once)
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        done = pool.map(
            lambda own: fit_member([prepared[i] for i in own], cfg, key, stage, faults or FaultPlan()),
            groups,
        )
        for own, own_results in zip(groups, list(done), strict=True):
            results.update(zip(own, own_results, strict=True))
    return [results[i] for i in range(len(jobs))]


def runs(members: list[list[int]], slots: int) -> list[list[int]]:
    """The Ray Train runs for ``members`` (each a list of job indices, kept together and in order) on
    ``slots`` trainings at once: one run per slot, each member joining the run with the fewest models so
    far, the members with the most models first (so that the runs take about as long as each other)."""
    groups: list[list[int]] = [[] for _ in range(max(1, min(slots, len(members))))]
    for own in sorted(members, key=len, reverse=True):
        min(groups, key=len).extend(own)
    return [g for g in groups if g]


def fit_member(
    jobs: list[tuple[Job, dict[str, Any], Augment]], cfg: RunConfig, key: str, stage: str, faults: FaultPlan
) -> list[dict[str, Any]]:
    """Train one member's jobs (each with its Ray Datasets: train, val, maybe predict, and the
    augmentation its worker applies to the train batches) one after another in one Ray Train run, and
    predict their rows; returns each one's best validation metrics and throughput. The probabilities
    stay in ``predictions/`` under each model's folder.

    ``stage`` is the stage the models belong to (its ``key`` marks a model finished); it names the Ray
    Train run and the fault-injection points (other stages, e.g. evaluate, train models too).
    """
    from ray.train import DataConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    prefix = "" if stage == "train" else f"{stage}-"
    names = [start_model_dir(job, cfg.out, key, prefix) for job, _, _ in jobs]
    # One name per dataset object: the val set is shared by the models of one input size.
    datasets: dict[str, Any] = {}
    named: dict[int, str] = {}
    parts = []
    for n, (job, data, augment) in enumerate(jobs):
        part: dict[str, Any] = {"predict": None}
        for role, ds in data.items():
            if id(ds) not in named:
                named[id(ds)] = f"{role}-{n}"
                datasets[named[id(ds)]] = ds
            part[role] = named[id(ds)]
        params = {**asdict(job.params), "augment": asdict(augment)}
        params["kill_at_epochs"] = faults.kill_epochs(f"{stage}:{job.params.member}")
        parts.append({**part, "params": params})
    run_name = names[0] if len(names) == 1 else f"{names[0]}-and-{len(names) - 1}-more"
    gpu = use_gpu(t.use_gpu)
    split = [name for name in datasets if not name.startswith("val-")] if t.num_workers > 1 else []
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"parts": parts},
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if gpu else {})},
        ),
        run_config=TrainRunConfig(
            name=run_name,
            storage_path=local_path(RunLayout(cfg.out).train_runs),
            # The run trains several models: each one keeps the failures a training survives.
            failure_config=FailureConfig(max_failures=t.max_failures * len(jobs)),
        ),
        datasets=datasets,
        # One worker iterates its datasets itself; splitting costs a coordinator actor's start-up.
        dataset_config=DataConfig(datasets_to_split=split),
    )
    trainer.fit()
    return [job_result(job, key) for job, _, _ in jobs]


def job_result(job: Job, key: str) -> dict[str, Any]:
    """A trained job's numbers from its files (history, predictions, its workers' part markers); marks
    it finished under ``key``."""
    model_dir = job.params.model_dir
    history = json.loads(storage.read_text(storage.join(model_dir, "history.json")))
    # The epoch the loop kept (under its params' select_by), as it recorded it.
    kept = history["history"][-1]["best_epoch"]
    best = next(r for r in history["history"] if r["epoch"] == kept)
    epochs = len(history["history"])
    train_s = sum(r["train_s"] for r in history["history"])
    predict_s = max((float(part["seconds"]) for part in prediction_parts(job)), default=0.0)
    timing = json.loads(storage.read_text(part_marker(model_dir, 0)))
    result = {
        "val_top1": best["val_top1"], "val_top5": best["val_top5"], "val_loss": best["val_loss"],
        "best_epoch": best["epoch"], "epochs": epochs, "starts": history["starts"],
        "seconds": round(timing["finished_at"] - timing["started_at"], 2),
        "started_at": timing["started_at"], "finished_at": timing["finished_at"],
        "train_images_per_s": round(len(job.train_rows) * epochs / train_s, 1),
        "predict_images_per_s": round(len(job.predict_rows) / predict_s, 1) if predict_s else None,
    }  # fmt: skip
    KeyedFolder(model_dir, key).mark_done(result)
    return result


def start_model_dir(job: Job, out: str, key: str, prefix: str = "") -> str:
    """Make the model's folder ready for training under ``key``; returns the Ray Train run name.

    Files of an unfinished training with the same key stay: its Ray Train checkpoints resume it. Files
    of another key (other settings or data) go, so that neither its weights, its predictions nor its
    checkpoints are taken for this one's. Fold models' folders, nested in the member's, are theirs.
    """
    model_dir = job.params.model_dir
    base = f"{prefix}{job.params.member}{'' if job.fold is None else f'-fold-{job.fold}'}"
    predictions = predictions_dir(model_dir).rsplit("/", 1)[-1]
    previous = KeyedFolder(model_dir, key).claim(whole=False, also=(predictions,))
    if previous is not None:  # its Ray Train run, alone or as the first of its member's (fit_member)
        runs = RunLayout(out).train_runs
        storage.remove(storage.join(runs, f"{base}-{previous}"))
        fs, path = storage.get_fs(runs)
        for stale in fs.glob(f"{path}/{base}-{previous}-and-*-more"):  # a member run with folds
            fs.rm(stale, recursive=True)
    return f"{base}-{key}"


def worker_request(cfg: RunConfig, gpu: bool, trainings: int = 1) -> Request:
    """What ``trainings`` trainings at once hold for as long as they run: their Ray Train workers."""
    t = cfg.train
    return Request("training worker", t.cpus_per_worker, t.gpus_per_worker if gpu else 0.0,
                   trainings * t.num_workers)  # fmt: skip


def data_cpus(cfg: RunConfig, trainings: int, resources: Mapping[str, float] | Sequence[Node],
              gpu: bool) -> float | None:  # fmt: skip
    """The CPUs each Ray Data task feeding ``trainings`` trainings asks for: a whole CPU, or what the
    workers leave on the node with the most room when that is less (half a CPU beside a half-CPU worker
    on a 1-CPU node); None when they leave less than ``MIN_TASK_CPUS`` anywhere. A mapping of totals is
    taken as one node."""
    return task_cpus(as_nodes(resources), [worker_request(cfg, gpu, trainings)])


def check_room(cfg: RunConfig, resources: Mapping[str, float] | Sequence[Node], gpu: bool) -> None:
    """Fail now, with what to change, when one training cannot be placed on the nodes with room beside
    it for the data tasks feeding it: Ray would wait for it forever."""
    nodes = as_nodes(resources)
    workers = worker_request(cfg, gpu)
    if not place(nodes, [workers]).placed:
        raise PlacementError(
            f"train: one training's workers ({workers.text()}: train.num_workers, train.cpus_per_worker"
            f"{', train.gpus_per_worker' if gpu else ''}) do not fit on the nodes ({describe_nodes(nodes)}). "
            f"Lower "
            f"train.cpus_per_worker or train.num_workers{', or set train.use_gpu: no' if gpu else ''}, or "
            f"add nodes."
        )
    if data_cpus(cfg, 1, nodes, gpu) is None:
        raise PlacementError(
            f"train: one training's workers ({workers.text()}) leave less than {MIN_TASK_CPUS:g} CPU on "
            f"every node for the data tasks feeding them (nodes: {describe_nodes(nodes)}). Lower "
            f"train.cpus_per_worker or train.num_workers, or add nodes."
        )


def concurrency(cfg: RunConfig, jobs: int, resources: Mapping[str, float] | Sequence[Node], gpu: bool) -> int:
    """Trainings at once: as configured, else as many as the nodes hold with room for their data tasks
    (on CPUs, training workers get at most half the CPUs, the data tasks feeding them the rest). A mapping
    of totals (``ray.cluster_resources()``) is taken as one node."""
    t, nodes = cfg.train, as_nodes(resources)
    if t.concurrent_members:
        if data_cpus(cfg, t.concurrent_members, nodes, gpu) is None:
            held = t.concurrent_members * t.num_workers * t.cpus_per_worker
            # The data tasks (decoding; every epoch for a dataset beyond the cache) need CPUs beside the
            # workers: without them, all the trainings wait for them forever.
            raise PlacementError(
                f"train: train.concurrent_members {t.concurrent_members} trainings hold {held:g} CPUs "
                f"(x train.num_workers x train.cpus_per_worker{', and GPUs' if gpu else ''}) and cannot "
                f"be placed with {MIN_TASK_CPUS:g} CPU left on a node for their data tasks (nodes: "
                f"{describe_nodes(nodes)}). Lower train.concurrent_members, or leave it unset to train as "
                f"many at once as fit."
            )
        return t.concurrent_members
    if gpu:  # trainings that share a GPU (gpus_per_worker < 1) fill it together
        slots = sum(n.gpus for n in nodes) // (t.gpus_per_worker * t.num_workers)
    else:  # training workers get half the CPUs; the data tasks feeding them the other half
        slots = sum(n.cpus for n in nodes) / 2 // (t.cpus_per_worker * t.num_workers)
    at_once = int(max(1, min(jobs, slots)))
    # Totals are not enough: each worker and each task lives on one node.
    while at_once > 1 and data_cpus(cfg, at_once, nodes, gpu) is None:
        at_once -= 1
    return at_once
