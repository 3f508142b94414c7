"""How the outside classifier's selection rule moves Table IV: val top-1 against val loss, over seeds.

On a finished run (``cropclean clean`` or ``make demo``), trains the run's ``evaluate.member`` on the
train originals once per seed, as the evaluate stage does (same augmentation, optimizer, schedule and
epochs; one process, no Ray), and after every epoch scores val, the test originals and the test
split's label-free crops of ``crop.method``. Prints, per seed, the epoch each rule keeps (the loop's own
``better``: ``top1``, ``loss``) and its label-free gain in points, then the smallest and mean gain per
rule. No timing: what it measures is the spread of Table IV's gain.

    python bench/selection.py demo-out/run [--seeds 0 1 2 3 4 5] [--epochs 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import manifests
from pipeline.config import RunConfig, build_config, load_config_file
from pipeline.evaluation.classify import with_boxes
from pipeline.models.augment import Augment, augment_images
from pipeline.models.data import decode_rows, decoded_size, training_rows
from pipeline.models.fit import augmentation
from pipeline.models.train_loop import (
    LoopState,
    TrainParams,
    better,
    epoch_lr,
    make_optimizer,
    run_epoch,
    set_trainable,  # fmt: skip
)
from pipeline.models.zoo import build_model
from pipeline.stages.evaluate import outside_params

RULES = ("top1", "loss")


def batches(data: dict[str, np.ndarray], size: int, order: np.ndarray | None = None) -> list[dict]:
    order = np.arange(len(data["label"])) if order is None else order
    return [{"image": torch.from_numpy(data["image"][order[i : i + size]]),
             "label": torch.from_numpy(data["label"][order[i : i + size]])}
            for i in range(0, len(order), size)]  # fmt: skip


@dataclass
class Prepared:
    """A run's evaluation data, decoded once for every seed."""

    params: TrainParams
    augment: Augment
    train: dict[str, np.ndarray]  # uint8, a little larger than the input: augmented afresh each epoch
    sets: dict[str, dict[str, np.ndarray]]  # val, test originals, test label-free crops


def prepare(run: str, cfg: RunConfig, epochs: int) -> Prepared:
    images = manifests.read_manifest("images", f"{run}/manifests/images.parquet")
    crops = manifests.read_manifest("crops", f"{run}/manifests/crops.parquet")
    ok = images[(images["status"] == "ok") & images["split"].notna()]
    classes = sorted(ok["label"].dropna().unique())
    rows = training_rows(images, classes)
    train, val, test = (rows[rows["split"] == s].reset_index(drop=True) for s in ("train", "val", "test"))
    p = outside_params(cfg, "outside", len(classes))
    p.finetune_epochs = epochs
    augment = augmentation(cfg, cfg.evaluate.augment_crop_min)
    label_free, _ = with_boxes(test, crops, cfg.crop.method, "predicted")
    sets = {"val": val, "original": test, "label_free": label_free}
    train_px = decode_rows(train, run, decoded_size(p.input_size, augment), as_float=False)
    scored = {name: decode_rows(frame, run, p.input_size, as_float=True) for name, frame in sets.items()}
    return Prepared(p, augment, train_px, scored)


def one_seed(prep: Prepared, seed: int) -> list[dict[str, float]]:
    """Per epoch: val top-1 and loss, top-1 on the test originals and on their label-free crops."""
    p, size = prep.params, prep.params.input_size
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(p.arch, p.classes, head=p.head, weights=p.weights, input_size=size)
    model = model.to(memory_format=torch.channels_last)
    device, history, optimizer, phase = torch.device("cpu"), [], None, None
    for epoch in range(p.epochs):  # the passes as the training loop runs them
        epoch_phase = "head" if epoch < p.head_epochs else "finetune"
        params = set_trainable(model, p, epoch)
        if optimizer is None or epoch_phase != phase or p.unfreeze == "blocks":
            optimizer, phase = make_optimizer(params, p, epoch), epoch_phase
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(p, epoch)
        model.train()
        set_trainable(model, p, epoch)
        order = rng.permutation(len(prep.train["label"]))
        run_epoch(model, batches(prep.train, p.batch_size, order), device, optimizer,
                  transform=lambda x: augment_images(x, size, prep.augment, generator))  # fmt: skip
        scores = {
            name: run_epoch(model, batches(data, 256), device, None) for name, data in prep.sets.items()
        }
        history.append({"epoch": epoch, "val_top1": scores["val"]["top1"], "val_loss": scores["val"]["loss"],
                        **{name: scores[name]["top1"] for name in ("original", "label_free")}})  # fmt: skip
    return history


def kept(history: list[dict[str, float]], rule: str) -> dict[str, float]:
    """The epoch the training loop keeps under ``rule``."""
    state, best = LoopState(), history[0]
    for h in history:
        if better({"top1": h["val_top1"], "loss": h["val_loss"]}, state, rule):
            state.best_top1, state.best_loss, best = h["val_top1"], h["val_loss"], h
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a finished run's OUT (local)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--epochs", type=int, help="default: the run's evaluate.epochs or train.finetune_epochs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = build_config(load_config_file(f"{args.run}/run.yaml"))
    epochs = args.epochs or cfg.evaluate.epochs or cfg.train.finetune_epochs
    m = cfg.evaluate.member
    zoom = cfg.evaluate.augment_crop_min or cfg.train.augment_crop_min
    print(f"{args.run}: outside {m.arch}@{m.input_size}, {epochs} epochs, zoom >= {zoom}")
    prep = prepare(args.run, cfg, epochs)
    gains: dict[str, list[float]] = {r: [] for r in RULES}
    for seed in args.seeds:
        history = one_seed(prep, seed)
        line = [f"seed {seed}:"]
        for rule in RULES:
            h = kept(history, rule)
            gains[rule].append(100 * (h["label_free"] - h["original"]))
            line.append(f"{rule} keeps epoch {h['epoch']}: {100 * h['original']:.1f}% -> "
                        f"{100 * h['label_free']:.1f}% ({gains[rule][-1]:+.1f})")  # fmt: skip
        print("  ".join(line), flush=True)
    for rule in RULES:
        g = gains[rule]
        print(f"{rule}: label-free gain min {min(g):+.1f}, mean {np.mean(g):+.1f} points over {len(g)} seeds")


if __name__ == "__main__":
    main()
