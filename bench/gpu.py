"""Per-stage throughput and device busy time of a food101-like run, and a projection for Food-101.

Generates a dataset (``cropclean synth``, images scaled up so that their short side is ``--side``),
runs ``cropclean clean --preset food101`` on it as a user would (a subprocess), and samples the GPU's
utilization beside it (NVML through ``nvidia-smi``, once a second) when there is a GPU. Afterwards it
reads each stage's window from ``stages/<stage>/_COMPLETE.json`` (seconds and end time) and prints per
stage: seconds, images/s, mean and median GPU busy %, and the share of samples at least 70% busy; for
training, each model's images/s from ``metrics.json``; then the same stages' time projected linearly to
Food-101 (101,000 images: 75,750 train, 25,250 test).

Members default to what trains anywhere without downloads: resnet50 at 224 (random init: torchvision's
weights need the network, the throughput is the same) and efficientnet_lite0 at 224 with the ImageNet
weights installed with the project. On a CPU it runs too, as a smoke test of the script and a baseline:
``python bench/gpu.py --images 160 --classes 4 --side 320 --set train.finetune_epochs=1 \\
--set 'train.members=[{arch: small_cnn, input_size: 64}]' --set normalize.min_side=128``.

    python bench/gpu.py [--images 10000] [--classes 20] [--side 512] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FOOD101 = {"images": 101_000, "train": 75_750}
MEMBERS = ("train.members=[{arch: resnet50, input_size: 224, name: resnet50_224}, "
           "{arch: efficientnet_lite0, weights: DEFAULT, input_size: 224, name: lite0_224}]")  # fmt: skip
STAGES = ("sources", "normalize", "dedupe", "split", "train", "crop", "evaluate", "export", "report")
LATER = ("crop", "evaluate", "export", "report")  # stages over the ok images with a split


class GpuSampler(threading.Thread):
    """``nvidia-smi``'s utilization.gpu once a second, with wall-clock times; nothing without a GPU."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.available = shutil.which("nvidia-smi") is not None
        self._done = threading.Event()

    def run(self) -> None:
        if not self.available:
            return
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._done.is_set():
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
                values = [float(v) for v in out.split()]
                if values:
                    self.samples.append((time.time(), statistics.mean(values)))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._done.wait(1.0)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=15)

    def within(self, start: float, end: float) -> list[float]:
        return [u for t, u in self.samples if start <= t <= end]


def generate(data: Path, images: int, classes: int, side: int) -> None:
    """Synthesize, then scale every image up so its short side is ``side`` (what normalize keeps)."""
    if (data / "ground_truth.parquet").exists():
        return
    per_class = max(2, images // classes)
    subprocess.run([sys.executable, "-m", "pipeline.cli", "synth", str(data), "--classes", str(classes),
                    "--per-class", str(per_class)], check=True, cwd=ROOT)  # fmt: skip
    for path in (data / "images").rglob("*.jpg"):
        try:
            with Image.open(path) as im:
                im.load()
                if im.mode != "RGB" or min(im.size) < 32:
                    continue  # the generator's hostile files stay as they are
                f = side / min(im.size)
                big = im.resize((round(im.width * f), round(im.height * f)), Image.Resampling.BILINEAR)
            big.save(path, quality=90)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # a hostile file: left for the validator


def stage_windows(run: Path) -> dict[str, tuple[float, float]]:
    """Each finished stage's (start, end) in epoch seconds, from its completion marker."""
    windows = {}
    for stage in STAGES:
        marker = run / "stages" / stage / "_COMPLETE.json"
        if marker.exists():
            record = json.loads(marker.read_text())
            end = (
                datetime.strptime(record["finished_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
            )
            windows[stage] = (end - float(record["seconds"]), end + 1.0)  # the end has whole seconds
    return windows


def summarize(run: Path, samples: list[tuple[float, float]], note: str) -> None:
    """Print the per-stage table of a finished run, with the GPU samples taken beside it."""
    import pandas as pd

    sampler = GpuSampler()
    sampler.samples = samples
    metrics = json.loads((run / "metrics.json").read_text())
    images = pd.read_parquet(run / "manifests" / "images.parquet")
    ok = images[(images["status"] == "ok") & images["split"].notna()]
    train = int((ok["split"] == "train").sum())
    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, GPU samples: {len(samples)}; {len(images)} images, "
          f"{len(ok)} ok, {train} train; {note}")  # fmt: skip
    head = f"{'stage':<10} {'seconds':>8} {'images/s':>9} {'busy mean':>10} {'median':>7} {'>=70%':>6}"
    print(f"{head}  Food-101 (h)")
    total = 0.0
    for stage, (t0, t1) in stage_windows(run).items():
        seconds = t1 - 1.0 - t0
        n = train if stage == "train" else len(ok) if stage in LATER else len(images)
        scale = FOOD101["train"] / max(train, 1) if stage == "train" else FOOD101["images"] / max(n, 1)
        busy = sampler.within(t0, t1)
        cells = f"{'-':>10} {'-':>7} {'-':>6}"
        if busy:
            share = sum(u >= 70 for u in busy) / len(busy)
            cells = f"{statistics.mean(busy):9.0f}% {statistics.median(busy):6.0f}% {share:6.0%}"
        rate = n / seconds if seconds > 0 else float("nan")
        total += seconds * scale
        print(f"{stage:<10} {seconds:8.1f} {rate:9.1f} {cells}  {seconds * scale / 3600:8.2f}")
    print(f"{'all':<10} {'':>8} {'':>9} {'':>10} {'':>7} {'':>6}  {total / 3600:8.2f}")
    print("\ntraining, per model (train images x epochs / training seconds):")
    training = metrics.get("training", {})
    for name, result in {**training.get("members", {}), **training.get("folds", {})}.items():
        print(f"  {name:<24} {result.get('train_images_per_s')} images/s, val top-1 {result.get('val_top1')}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--side", type=int, default=512, help="short side of the generated images")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu"))
    parser.add_argument("--set", action="append", default=[], dest="sets", help="extra --set for the run")
    parser.add_argument("--no-default-members", action="store_true", help="keep the preset's members")
    parser.add_argument("--report-only", action="store_true", help="print a finished run's table again")
    args = parser.parse_args()
    out = Path(args.out)
    data, run = out / "data", out / "run"
    samples_file = out / "gpu-samples.json"
    if args.report_only:
        samples = json.loads(samples_file.read_text()) if samples_file.exists() else []
        summarize(run, [tuple(s) for s in samples], "(a finished run)")
        return 0
    shutil.rmtree(run, ignore_errors=True)
    start = time.perf_counter()
    generate(data, args.images, args.classes, args.side)
    print(f"data: {data} ({time.perf_counter() - start:.0f} s)")

    sets = ([] if args.no_default_members else [MEMBERS]) + ["evaluate.retrain=false", *args.sets]
    cmd = [sys.executable, "-m", "pipeline.cli", "clean", str(data), "--out", str(run), "--preset", "food101"]
    for s in sets:
        cmd += ["--set", s]
    sampler = GpuSampler()
    sampler.start()
    start = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    wall = time.perf_counter() - start
    sampler.stop()
    samples_file.write_text(json.dumps(sampler.samples))
    if rc != 0:
        print(f"cropclean clean exited {rc}")
        return rc
    summarize(run, sampler.samples, f"clean {wall:.0f} s; {' '.join(sets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
