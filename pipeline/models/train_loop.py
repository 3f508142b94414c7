"""The training loop run by each Ray Train worker: two-pass fine-tuning with validation-only selection.

Pass 1 trains the head with the trunk frozen; pass 2 unfreezes the trunk (all at once, or one more top
block per epoch) at a lower learning rate. After every epoch the loop evaluates on the validation split
only, keeps the best weights by validation top-1 (ties: lower loss) or, with ``select_by="loss"``, by
validation loss (ties: higher top-1), reports metrics and a checkpoint to Ray Train, and stops early
when validation stops improving. A restarted worker resumes from the last reported checkpoint, not from
scratch. Once training is done, each worker predicts its share of the ``predict`` dataset with the best
weights (no second start-up, and on the worker's GPU when it has one).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import storage
from pipeline.models.augment import Augment, augment_images
from pipeline.models.zoo import (
    ModelError,
    build_model,
    head_parameters,
    load_checkpoint,
    torch_load,
    trunk_blocks,
)

SHUFFLE_BUFFER = 2048  # rows; each epoch shuffles within this window (row order is also permuted once)


@dataclass
class TrainParams:
    member: str
    arch: str
    classes: int
    model_dir: str  # OUT/models/<member>[/fold-k]
    head: str = "linear"
    weights: str | None = None
    input_size: int = 224
    batch_size: int = 32
    head_epochs: int = 2
    finetune_epochs: int = 4
    lr_head: float = 1e-2
    lr_finetune: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | constant
    unfreeze: str = "all"  # all | blocks
    patience: int = 3
    select_by: str = "top1"  # top1 | loss: what "best on validation" means
    seed: int = 0
    threads: int = 1  # torch threads on CPU
    compile: bool = False  # run the training and validation passes through torch.compile
    # The training batches' augmentation (``Augment``'s fields), done by the worker on its device; the
    # train dataset holds decoded uint8 images a little larger than input_size.
    augment: dict[str, Any] = field(default_factory=lambda: asdict(Augment()))
    # Fault injection: the worker process dies once in the middle of each of these epochs (epoch
    # ``epochs``: while predicting).
    kill_at_epochs: list[int] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return self.head_epochs + self.finetune_epochs


@dataclass
class LoopState:
    epoch: int = 0  # next epoch to run
    best_top1: float = -1.0
    best_loss: float = float("inf")
    best_epoch: int = -1
    since_best: int = 0
    done: bool = False  # training finished (all epochs, or stopped early); prediction may be left
    history: list[dict[str, Any]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # epochs at which a (re)start began


def set_trainable(model: nn.Module, p: TrainParams, epoch: int) -> list[nn.Parameter]:
    """Freeze or unfreeze for this epoch; returns the parameters to optimize."""
    inner = model.module if hasattr(model, "module") else model
    for param in inner.parameters():
        param.requires_grad = False
    for param in head_parameters(inner):
        param.requires_grad = True
    if epoch >= p.head_epochs:
        blocks = trunk_blocks(inner)
        if p.unfreeze == "blocks":  # one more block from the top each fine-tuning epoch
            blocks = blocks[-(epoch - p.head_epochs + 1) :]
        for block in blocks:
            for param in block.parameters():
                param.requires_grad = True
    # Batch-norm statistics of a frozen trunk stay as they are.
    for module in inner.trunk.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval() if not any(q.requires_grad for q in module.parameters()) else module.train()
    return [q for q in inner.parameters() if q.requires_grad]


def epoch_lr(p: TrainParams, epoch: int) -> float:
    """The pass's learning rate, decayed along a cosine over the pass's epochs when so configured."""
    if epoch < p.head_epochs:
        base, i, n = p.lr_head, epoch, p.head_epochs
    else:
        base, i, n = p.lr_finetune, epoch - p.head_epochs, p.finetune_epochs
    return base if p.schedule == "constant" else base * 0.5 * (1 + math.cos(math.pi * i / n))


def make_optimizer(params: list[nn.Parameter], p: TrainParams, epoch: int) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=epoch_lr(p, epoch), weight_decay=p.weight_decay)


def better(val: dict[str, float], state: LoopState, select_by: str) -> bool:
    """Whether this epoch's validation numbers beat the best so far under ``select_by``."""
    top1, loss = (val["top1"], state.best_top1), (val["loss"], state.best_loss)
    if select_by == "loss":
        return loss[0] < loss[1] or (loss[0] == loss[1] and top1[0] > top1[1])
    return top1[0] > top1[1] or (top1[0] == top1[1] and loss[0] < loss[1])


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum())


def run_epoch(model: nn.Module, batches: Any, device: torch.device, optimizer: torch.optim.Optimizer | None,
              on_batch: Any = None, transform: Any = None) -> dict[str, float]:  # fmt: skip
    """One pass over ``batches`` (dicts with 'image' and 'label'); trains when an optimizer is given.
    ``transform`` (images on the device -> model input) augments each batch when given."""
    training = optimizer is not None
    if not training:
        model.eval()
    loss_fn = nn.CrossEntropyLoss()
    total = loss_sum = top1 = top5 = 0
    cuda = device.type == "cuda"
    with torch.set_grad_enabled(training):
        for i, batch in enumerate(batches):
            x = batch["image"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            if training and len(y) < 2:  # batch norm cannot train on one image (a last, ragged batch)
                continue
            if transform is not None:
                x = transform(x)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = model(x)
                loss = loss_fn(logits.float(), y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            n = len(y)
            total += n
            loss_sum += float(loss.detach()) * n
            top1 += topk_hits(logits, y, 1)
            top5 += topk_hits(logits, y, 5)
            if on_batch:
                on_batch(i)
    return {"loss": loss_sum / max(total, 1), "top1": top1 / max(total, 1), "top5": top5 / max(total, 1),
            "images": total}  # fmt: skip


def augmenter(p: TrainParams, epoch: int, rank: int) -> Any:
    """The epoch's augmentation of uint8 batches on their device; its draws repeat for a restarted epoch."""
    augment = Augment(**{**p.augment, "crop_scale": tuple(p.augment["crop_scale"])})
    generator = torch.Generator().manual_seed(p.seed * 1_000_003 + epoch * 1_009 + rank)
    return lambda images: augment_images(images, p.input_size, augment, generator)


def train_batches(shard: Any, p: TrainParams, epoch: int) -> Any:
    """An epoch's training batches, shuffled: the manifest lists images class by class, and batches of
    one class each do not train at all."""
    return shard.iter_torch_batches(batch_size=p.batch_size, local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                    local_shuffle_seed=p.seed + epoch)  # fmt: skip


def predict_batches(model: nn.Module, batches: Any, device: torch.device,
                    on_batch: Any = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Row numbers and class probabilities for every batch (dicts with 'image' and 'row')."""
    model.eval()
    rows, probs = [np.zeros(0, dtype=np.int64)], []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if on_batch:
                on_batch(i)
            x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x)
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            rows.append(batch["row"].cpu().numpy())
    return np.concatenate(rows), np.concatenate(probs) if probs else np.zeros((0, 0), dtype=np.float32)


def predictions_dir(model_dir: str) -> str:
    """Where each worker writes ``rank-<r>.npz``: its rows' numbers, probabilities and seconds taken."""
    return storage.join(model_dir, "predictions")


def write_history(p: TrainParams, state: LoopState) -> None:
    history = json.dumps({"history": state.history, "starts": state.starts})
    storage.write_text_atomic(storage.join(p.model_dir, "history.json"), history)


def save_torch(obj: Any, uri: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())


def _maybe_die(p: TrainParams, state: LoopState, epoch: int, batch: int) -> None:
    """Fault injection: end this worker process abruptly, once, in the middle of an epoch."""
    if epoch not in p.kill_at_epochs or batch != 1:
        return
    marker = storage.join(p.model_dir, f"_killed_in_epoch_{epoch}")
    if not storage.exists(marker):
        storage.write_text_atomic(marker, "killed\n")
        # Ray Train registers a reported checkpoint when its controller next polls the workers; on tiny
        # test epochs, wait for that as the middle of a real epoch would have.
        if state.history:
            _wait_until_registered(state.history[-1])
        os._exit(137)


def _wait_until_registered(reported: dict[str, Any], timeout_s: float = 600.0) -> None:
    """Wait until Ray Train's controller has registered the checkpoint reported with ``reported`` (its
    checkpoint manager's snapshot in the run's storage names the latest one), rather than for a fixed
    time that a busy machine can outlast."""
    import ray.train

    run_storage = ray.train.get_context().get_storage()
    fs, path = run_storage.storage_filesystem, run_storage.checkpoint_manager_snapshot_path
    want = {k: json.dumps(v) for k, v in reported.items()}  # as text: NaN equals NaN
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with fs.open_input_stream(path) as fh:
                latest = json.loads(fh.read()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):
            latest = {}
        metrics = latest.get("metrics") or {}
        if all(json.dumps(metrics.get(k)) == v for k, v in want.items()):
            return
        time.sleep(0.1)
    raise TimeoutError(f"Ray Train registered no checkpoint with {reported} in {timeout_s:g} s")


def load_resume_state(path: str) -> dict[str, Any]:
    """The state a restarted worker resumes from (Ray Train's ``state.pt``), loaded without running code
    (``weights_only=True``: it holds state dicts and plain values only)."""
    saved = torch_load(path, "training state")
    if not isinstance(saved, dict) or any(
        k not in saved for k in ("model_dir", "model", "optimizer", "loop")
    ):
        raise ModelError(f"training state {path} lacks model_dir, model, optimizer or loop")
    return saved


def part_marker(model_dir: str, rank: int) -> str:
    """Written by each worker once its part (training and prediction) is finished."""
    return storage.join(model_dir, f"_PART_DONE-rank-{rank}.json")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker=...)``).

    ``config["parts"]``: the models this run trains, one after another (each a dict of ``params`` and
    the names of its ``train``, ``val`` and ``predict`` datasets, ``predict`` None when it has none), so
    that the worker group's start-up is paid once for all of them (a member's full-data and fold
    models). A restarted worker skips the parts it finished and resumes the one the last checkpoint
    belongs to.
    """
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    checkpoint = ray.train.get_checkpoint()
    saved = None
    if checkpoint:
        with checkpoint.as_directory() as d:
            saved = load_resume_state(os.path.join(d, "state.pt"))
    for part in config["parts"]:
        p = TrainParams(**part["params"])
        if storage.exists(part_marker(p.model_dir, rank)):
            continue
        mine = saved is not None and saved.get("model_dir") == p.model_dir
        started_at = time.time()
        train_part(p, part, saved if mine else None, rank)
        finished = {"started_at": round(started_at, 2), "finished_at": round(time.time(), 2)}
        storage.write_text_atomic(part_marker(p.model_dir, rank), json.dumps(finished))


def runner_for(model: nn.Module, p: TrainParams) -> nn.Module:
    """What the training and validation passes call: ``model``, or with ``p.compile`` its compiled
    wrapper, which shares its parameters (weights are saved and loaded through ``model``)."""
    return torch.compile(model) if p.compile else model


def train_part(p: TrainParams, part: dict[str, Any], saved: dict[str, Any] | None, rank: int) -> None:
    """Train one model (resuming from ``saved``, its last checkpoint, when given) and predict."""
    import ray.train
    import ray.train.torch

    torch.manual_seed(p.seed)
    torch.set_num_threads(p.threads)
    device = ray.train.torch.get_device()
    model = build_model(p.arch, p.classes, head=p.head, weights=p.weights, input_size=p.input_size)
    state, optimizer_state = LoopState(), None
    if saved is not None:
        model.load_state_dict(saved["model"])
        state, optimizer_state = LoopState(**saved["loop"]), saved["optimizer"]
    state.starts.append(state.epoch)
    # Channels-last convolutions: faster on GPUs (tensor cores) and on CPUs too (oneDNN; measured 1.1x to
    # 1.4x a training step of small_cnn and resnet18 at 48 to 64 px, docs/benchmarks.md).
    model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    runner = runner_for(model, p)
    if state.done and rank == 0:  # resumed after training, to predict: record this start too
        write_history(p, state)
    train_shard = ray.train.get_dataset_shard(part["train"])
    val_shard = ray.train.get_dataset_shard(part["val"])

    optimizer, phase = None, None
    for epoch in range(state.epoch, p.epochs if not state.done else state.epoch):
        epoch_phase = "head" if epoch < p.head_epochs else "finetune"
        params = set_trainable(model, p, epoch)
        if optimizer is None or epoch_phase != phase or p.unfreeze == "blocks":
            optimizer = make_optimizer(params, p, epoch)
            if optimizer_state is not None and epoch == state.epoch:
                # A different parameter set (a phase boundary) cannot take the old state: start afresh.
                with contextlib.suppress(ValueError):
                    optimizer.load_state_dict(optimizer_state)
            phase = epoch_phase
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(p, epoch)
        model.train()
        set_trainable(model, p, epoch)  # re-applies eval() on frozen batch norms after train()
        t0 = time.perf_counter()
        batches = train_batches(train_shard, p, epoch)
        train = run_epoch(
            runner, batches, device, optimizer, on_batch=lambda i, e=epoch: _maybe_die(p, state, e, i),
            transform=augmenter(p, epoch, rank),
        )  # fmt: skip
        t1 = time.perf_counter()
        val = run_epoch(runner, val_shard.iter_torch_batches(batch_size=p.batch_size), device, None)
        t2 = time.perf_counter()
        improved = better(val, state, p.select_by)
        inner = model.module if hasattr(model, "module") else model
        if improved:
            state.best_top1, state.best_loss, state.best_epoch, state.since_best = (
                val["top1"],
                val["loss"],
                epoch,
                0,
            )
            if rank == 0:
                save_torch({"model": inner.state_dict(), "params": asdict(p), "epoch": epoch, "val": val},
                           storage.join(p.model_dir, "best.pt"))  # fmt: skip
        else:
            state.since_best += 1
        record = {
            "epoch": epoch, "phase": epoch_phase, "lr": epoch_lr(p, epoch), "train_loss": train["loss"],
            "train_top1": train["top1"],
            "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
            "best_epoch": state.best_epoch, "train_s": round(t1 - t0, 2), "val_s": round(t2 - t1, 2),
        }  # fmt: skip
        state.history.append(record)
        state.epoch = epoch + 1
        stop = epoch_phase == "finetune" and state.since_best >= p.patience
        state.done = stop or state.epoch == p.epochs
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                snapshot = {
                    "model_dir": p.model_dir,  # which part of the run this checkpoint belongs to
                    "model": inner.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "loop": asdict(state),
                }
                torch.save(snapshot, os.path.join(d, "state.pt"))
                write_history(p, state)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report({**record, "stopped_early": stop}, checkpoint=ckpt)
        if stop:
            break

    if part.get("predict"):  # the model has rows to predict
        predict_shard = ray.train.get_dataset_shard(part["predict"])
        inner = model.module if hasattr(model, "module") else model
        best = load_checkpoint(storage.join(p.model_dir, "best.pt"))
        inner.load_state_dict(best["model"])
        start = time.perf_counter()
        batches = predict_shard.iter_torch_batches(batch_size=p.batch_size)
        rows, probs = predict_batches(
            inner, batches, device, on_batch=lambda i: _maybe_die(p, state, p.epochs, i)
        )
        buf = io.BytesIO()
        np.savez(buf, row=rows, probs=probs, seconds=time.perf_counter() - start)
        storage.write_bytes_atomic(
            storage.join(predictions_dir(p.model_dir), f"rank-{rank}.npz"), buf.getvalue()
        )
