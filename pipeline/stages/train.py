"""Stage ``train``: fine-tune every ensemble member on Ray Train, then predict.

Each member trains on the train split and selects its weights on the val split (never on test). With
``train.folds = K`` each member is also trained K times on K-1 folds of train, so that every train
image gets class probabilities from models that never saw it (out-of-fold). Predictions go to
``manifests/predictions.parquet``; weights, per-epoch history and Ray Train checkpoints to
``OUT/models/<member>[/fold-<k>]/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from pipeline import manifests, storage
from pipeline.config import MemberConfig, RunConfig
from pipeline.models.data import Augment, decoded_bytes, ray_dataset, training_rows
from pipeline.models.train_loop import TrainParams, part_marker, predictions_dir, train_loop_per_worker
from pipeline.models.zoo import ARCHS
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
from pipeline.stages.base import Resources, RunContext, Stage
from pipeline.summary import update_metrics

log = logging.getLogger("cropclean")

TOPK = 5  # classes kept per prediction ...
FULL_VECTOR_CLASSES = 20  # ... unless there are at most this many: then all of them


@dataclass
class Job:
    member: MemberConfig
    fold: int | None  # None: the full-data model
    params: TrainParams
    train_rows: pd.DataFrame
    predict_rows: pd.DataFrame  # what this model predicts: val+test (full), its held-out fold (fold)


def fold_of(image_ids: pd.Series, folds: int, seed: int) -> pd.Series:
    return image_ids.map(lambda i: int(hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:8], 16) % folds)


def model_dir(out: str, member: str, fold: int | None) -> str:
    return storage.join(out, "models", member, *([f"fold-{fold}"] if fold is not None else []))


def local_path(uri: str) -> str:
    """Ray Train wants an absolute local path or a URI."""
    return uri if "://" in uri else os.path.abspath(uri)


def use_gpu(choice: str) -> bool:
    import ray

    return choice == "yes" or (choice == "auto" and ray.cluster_resources().get("GPU", 0) > 0)


def member_params(cfg: RunConfig, m: MemberConfig, name: str, classes: int, model_dir: str,
                  **overrides: Any) -> TrainParams:  # fmt: skip
    """A training's settings: member ``m``'s architecture, head, weights and size, its own passes where it
    sets them, everything else from ``train``; ``overrides`` replace any of them (the evaluation's epochs
    and selection rule)."""
    t = cfg.train
    settings: dict[str, Any] = dict(
        member=name, arch=m.arch, classes=classes, model_dir=model_dir, head=m.head, weights=m.weights,
        input_size=m.input_size or ARCHS[m.arch].default_size, batch_size=t.batch_size,
        head_epochs=own(m.head_epochs, t.head_epochs),
        finetune_epochs=own(m.finetune_epochs, t.finetune_epochs),
        lr_head=own(m.lr_head, t.lr_head), lr_finetune=own(m.lr_finetune, t.lr_finetune),
        weight_decay=t.weight_decay, schedule=t.schedule, unfreeze=t.unfreeze,
        patience=t.patience, select_by=t.select_by, seed=t.seed, threads=max(1, int(t.cpus_per_worker)),
    )  # fmt: skip
    return TrainParams(**{**settings, **overrides})


def own(member_value: Any, default: Any) -> Any:
    """A member's own setting, or the section's when the member leaves it unset."""
    return default if member_value is None else member_value


def make_jobs(cfg: RunConfig, rows: pd.DataFrame, classes: list[str]) -> list[Job]:
    t = cfg.train
    train = rows[rows["split"] == "train"]
    heldout = rows[rows["split"].isin(["val", "test"])]
    folds = fold_of(train["image_id"], t.folds, t.seed) if t.folds else None
    jobs = []
    for m in t.members:
        for fold in [None, *range(t.folds)]:
            params = member_params(cfg, m, m.label, len(classes), model_dir(cfg.out, m.label, fold))
            if fold is None:
                # Without cross-fitting, the full model also labels train images (in-sample).
                predict = heldout if t.folds else rows
                jobs.append(Job(m, None, params, train, predict))
            else:
                jobs.append(Job(m, fold, params, train[folds != fold], train[folds == fold]))
    return jobs


def finished_result(job: Job, ctx: RunContext, stage: str = "train") -> dict[str, Any] | None:
    """The job's result when it finished in an earlier run with the same settings and data."""
    done = storage.join(job.params.model_dir, "_COMPLETE.json")
    if storage.exists(done):
        finished = json.loads(storage.read_text(done))
        if finished.get("key") == ctx.keys.get(stage, ""):
            return finished["result"]
    return None


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
    jobs: list[tuple[Job, pd.DataFrame]], cfg: RunConfig, ctx: RunContext, stage: str = "train",
    augment: Augment | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Train every (job, val rows) pair and predict its rows; returns their results in order.

    A member's unfinished jobs (its full-data model and its fold models) are one Ray Train run that
    trains them one after another, so its worker group starts once, not once per model (on 2 cores
    that start-up is 16 to 28 s); as many such runs go at a time as the cluster holds (``concurrency``),
    the next starting when one ends. Their datasets are prepared first (``DatasetCache``). Jobs finished
    in an earlier run with the same key are not trained again. ``augment``: the training augmentation,
    when not ``train``'s.
    """
    nodes, gpu = alive_nodes(), use_gpu(cfg.train.use_gpu)
    check_room(cfg, nodes, gpu)
    results: dict[int, dict[str, Any]] = {}
    todo = []
    for i, (job, _) in enumerate(jobs):
        finished = finished_result(job, ctx, stage)
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
    cache = DatasetCache(cfg, ctx.out, augment, task_cpus=share)
    prepared = {i: (jobs[i][0], cache.job(*jobs[i]), augment_of(cache, jobs[i][0])) for i in todo}
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        done = pool.map(
            lambda own: fit_member([prepared[i] for i in own], cfg, ctx, stage),
            members.values(),
        )
        for own, own_results in zip(members.values(), list(done), strict=True):
            results.update(zip(own, own_results, strict=True))
    return [results[i] for i in range(len(jobs))]


def fit_member(
    jobs: list[tuple[Job, dict[str, Any], Augment]], cfg: RunConfig, ctx: RunContext, stage: str = "train"
) -> list[dict[str, Any]]:
    """Train one member's jobs (each with its Ray Datasets: train, val, maybe predict, and the
    augmentation its worker applies to the train batches) one after another in one Ray Train run, and
    predict their rows; returns each one's best validation metrics and throughput. The probabilities
    stay in ``predictions/`` under each model's folder.

    ``stage`` is the stage the models belong to: its completion key marks a model finished, and names
    the Ray Train run and the fault-injection points (other stages, e.g. evaluate, train models too).
    """
    from ray.train import DataConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    key = ctx.keys.get(stage, "")  # the stage's key: its settings and the data it reads
    prefix = "" if stage == "train" else f"{stage}-"
    names = [start_model_dir(job, ctx.out, key, prefix) for job, _, _ in jobs]
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
        params["kill_at_epochs"] = ctx.faults.kill_epochs(f"{stage}:{job.params.member}")
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
            storage_path=local_path(storage.join(ctx.out, "models", "_ray")),
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
    storage.write_text_atomic(
        storage.join(model_dir, "_COMPLETE.json"), json.dumps({"key": key, "result": result})
    )
    return result


def start_model_dir(job: Job, out: str, key: str, prefix: str = "") -> str:
    """Make the model's folder ready for training under ``key``; returns the Ray Train run name.

    Files of an unfinished training with the same key stay: its Ray Train checkpoints resume it. Files
    of another key (other settings or data) go, so that neither its weights, its predictions nor its
    checkpoints are taken for this one's. Fold models' folders, nested in the member's, are theirs.
    """
    model_dir = job.params.model_dir
    base = f"{prefix}{job.params.member}{'' if job.fold is None else f'-fold-{job.fold}'}"
    key_file = storage.join(model_dir, "_KEY")
    previous = storage.read_text(key_file).strip() if storage.exists(key_file) else None
    if previous != key:
        for uri in storage.list_files(model_dir):
            storage.remove(uri)
        storage.remove(predictions_dir(model_dir))
        if previous is not None:  # its Ray Train run, alone or as the first of its member's (fit_member)
            runs = storage.join(out, "models", "_ray")
            storage.remove(storage.join(runs, f"{base}-{previous}"))
            fs, path = storage.get_fs(runs)
            for stale in fs.glob(f"{path}/{base}-{previous}-and-*-more"):  # a member run with folds
                fs.rm(stale, recursive=True)
        storage.write_text_atomic(key_file, key)
    return f"{base}-{key}"


def prediction_parts(job: Job) -> list[dict[str, np.ndarray]]:
    """The prediction files the job's workers wrote (one per rank)."""
    parts = []
    for uri in storage.list_files(predictions_dir(job.params.model_dir), ".npz"):
        with np.load(io.BytesIO(storage.read_bytes(uri))) as f:
            parts.append({k: f[k] for k in f.files})
    return parts


def predicted_probs(job: Job) -> np.ndarray:
    """Class probabilities of ``job.predict_rows`` (in row order), assembled from the workers' files."""
    probs = np.full((len(job.predict_rows), job.params.classes), np.nan, dtype=np.float32)
    for part in prediction_parts(job):
        probs[part["row"]] = part["probs"]
    missing = int(np.isnan(probs).any(axis=1).sum())
    if missing:
        raise RuntimeError(f"{job.params.model_dir}: {missing} of {len(probs)} rows have no prediction")
    return probs


def prediction_rows(job: Job, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    rows = job.predict_rows
    k = len(classes) if len(classes) <= FULL_VECTOR_CLASSES else TOPK
    order = np.argsort(-probs, axis=1)[:, :k]
    names = np.asarray(classes)
    label_idx = rows["label_idx"].to_numpy()
    return pd.DataFrame({
        "image_id": rows["image_id"].to_numpy(),
        "member": job.member.label,
        "fold": job.fold,
        "predicted": names[order[:, 0]],
        "confidence": probs[np.arange(len(rows)), order[:, 0]],
        "label_prob": probs[np.arange(len(rows)), label_idx],
        "topk_labels": [list(names[o]) for o in order],
        "topk_probs": [list(probs[i, o]) for i, o in enumerate(order)],
    })  # fmt: skip


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


class TrainStage(Stage):
    name = "train"
    resources = Resources(cpus=1)
    config_sections: ClassVar[tuple[str, ...]] = ("train",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg = ctx.cfg
        images = manifests.read_manifest("images", ctx.manifest("images"))
        ok = images[(images["status"] == "ok") & images["split"].notna()]
        classes = sorted(ok["label"].dropna().unique())
        storage.write_text_atomic(ctx.uri("models", "classes.json"), json.dumps(classes))
        rows = training_rows(images, classes)
        val_rows = rows[rows["split"] == "val"]
        if val_rows.empty:
            raise ValueError("training needs a val split for checkpoint selection (it never selects on test)")
        jobs = make_jobs(cfg, rows, classes)
        results = fit_all([(job, val_rows) for job in jobs], cfg, ctx)
        frames = [prediction_rows(job, predicted_probs(job), classes) for job in jobs]
        manifests.write_manifest(
            "predictions", pd.concat(frames, ignore_index=True), ctx.manifest("predictions")
        )
        members = {j.member.label: r for j, r in zip(jobs, results, strict=True) if j.fold is None}
        folds = {
            f"{j.member.label}/fold-{j.fold}": r
            for j, r in zip(jobs, results, strict=True)
            if j.fold is not None
        }
        update_metrics(cfg.out, "training", {"members": members, "folds": folds, "classes": len(classes)})
        summary = {m: {"val_top1": r["val_top1"], "val_top5": r["val_top5"]} for m, r in members.items()}
        return {"members": summary, "models": len(jobs), "classes": len(classes)}
