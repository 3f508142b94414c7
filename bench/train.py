"""Training and inference throughput per member: cropclean on Ray Train against a plain PyTorch loop.

Both sides train the same member from random init on the same ingested images, with the same
augmentation, batch size and epochs, on this machine (GPU when there is one). The plain loop keeps the
decoded images in one process and is timed without decoding; cropclean's numbers come from its own
per-epoch timings (``history.json``): the steady-state epochs (the first one also decodes and starts
Ray Data) and the prediction pass (Ray Data start-up and model load included).

    python bench/train.py [--members small_cnn@48,resnet18@48,mobilenet_v3_small@64] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main as cli_main
from pipeline.config import build_config, load_config_file
from pipeline.ingest import ingest_stages
from pipeline.models.augment import Augment, augment_images
from pipeline.models.data import decode_rows, training_rows
from pipeline.models.zoo import build_model
from pipeline.runner import run_stages
from pipeline.stages.train import TrainStage


def prepare(out: Path, classes: int, per_class: int, clutter: float) -> Path:
    run = out / "run"
    if not (run / "manifests" / "images.parquet").exists():
        data = str(out / "data")
        cli_main(["synth", data, "--classes", str(classes), "--per-class", str(per_class),
                  "--clutter", str(clutter)])  # fmt: skip
        cli_main(["ingest", data, "--out", str(run), "--preset", "cpu-small"])
    return run


def plain_pytorch(run: Path, arch: str, size: int, epochs: int, batch: int, threads: int) -> dict[str, float]:
    """Train and predict in one process on pre-decoded images; images/s for each."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = pd.read_parquet(run / "manifests" / "images.parquet")
    classes = sorted(images.loc[(images["status"] == "ok") & images["split"].notna(), "label"].unique())
    rows = training_rows(images, classes)

    train = decode_rows(rows[rows["split"] == "train"], str(run), round(size * 8 / 7), False)
    held = decode_rows(rows[rows["split"] != "train"], str(run), size, True)
    model = build_model(arch, len(classes), input_size=size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    augment, n, seen = Augment(), len(train["label"]), 0
    pixels, labels = torch.from_numpy(train["image"]), torch.from_numpy(train["label"])
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.from_numpy(np.random.permutation(n))
        for i in range(0, n - 1, batch):
            idx = order[i : i + batch]
            x = augment_images(pixels[idx].to(device), size, augment, generator)
            y = labels[idx].to(device)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            seen += len(idx)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(held["label"]), batch):
            model(torch.from_numpy(held["image"][i : i + batch]).to(device)).argmax(1).cpu()
    infer_s = time.perf_counter() - start
    return {"train": seen / train_s, "infer": len(held["label"]) / infer_s, "train_images": n}


def cropclean(run: Path, arch: str, size: int, epochs: int, batch: int) -> dict[str, float]:
    """Train and predict with the train stage; images/s from its own timings."""
    shutil.rmtree(run / "models", ignore_errors=True)
    shutil.rmtree(run / "stages" / "train", ignore_errors=True)
    doc = load_config_file(str(run / "run.yaml"))
    doc.pop("train", None)
    cfg = build_config(doc, sets=[
        f"train.members=[{{arch: {arch}, input_size: {size}}}]", "train.head_epochs=0",
        f"train.finetune_epochs={epochs}", "train.patience=99", f"train.batch_size={batch}",
    ])  # fmt: skip
    start = time.perf_counter()
    run_stages(cfg, [*ingest_stages(), TrainStage()])
    stage_s = time.perf_counter() - start
    history = json.loads((run / "models" / arch / "history.json").read_text())["history"]
    member = json.loads((run / "metrics.json").read_text())["training"]["members"][arch]
    images = pd.read_parquet(run / "manifests" / "images.parquet")
    n = int(((images["status"] == "ok") & (images["split"] == "train")).sum())
    steady = [r["train_s"] for r in history[1:]] or [history[0]["train_s"]]
    return {"train": n / float(np.mean(steady)), "first_epoch": n / history[0]["train_s"],
            "infer": member["predict_images_per_s"], "stage_s": stage_s}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench/out/train")
    parser.add_argument("--members", default="small_cnn@48,resnet18@48,mobilenet_v3_small@64")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--clutter", type=float, default=0.5)
    args = parser.parse_args()
    run = prepare(Path(args.out), args.classes, args.per_class, args.clutter)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, GPU: {gpu}")
    header = (
        "| member | plain train img/s (1 thread / all) | cropclean train img/s (first epoch) "
        "| cropclean / plain (1 thread) | plain infer img/s | cropclean infer img/s | stage s |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|")
    for spec in args.members.split(","):
        arch, size = spec.split("@")
        one = plain_pytorch(run, arch, int(size), args.epochs, args.batch, threads=1)
        every = plain_pytorch(run, arch, int(size), args.epochs, args.batch, threads=os.cpu_count() or 1)
        ours = cropclean(run, arch, int(size), args.epochs, args.batch)
        print(f"| {arch}@{size} | {one['train']:.0f} / {every['train']:.0f} | {ours['train']:.0f} "
              f"({ours['first_epoch']:.0f}) | {ours['train'] / one['train']:.2f}x | {every['infer']:.0f} | "
              f"{ours['infer']:.0f} | {ours['stage_s']:.0f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
