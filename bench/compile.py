"""torch.compile against eager for cropclean's training and validation passes (``run_epoch``), per member.

Random batches of 32 at the member's input size, channels-last, SGD with momentum; the device is the GPU
when there is one (bf16 autocast, as in training), else the CPU with ``--threads`` torch threads. For each
member and mode: the first step's seconds (compiling, for the compiled mode) and the steady images/s of
the steps after it, for training and for validation.

    python bench/compile.py [--members small_cnn@64,efficientnet_lite0@128] [--threads 1] [--steps 6]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models.train_loop import run_epoch
from pipeline.models.zoo import build_model


def timed(runner: torch.nn.Module, batches: list[dict], device: torch.device,
          opt: torch.optim.Optimizer | None, batch: int) -> tuple[float, float]:  # fmt: skip
    """Seconds of the first step, images/s of the rest."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    run_epoch(runner, batches[:1], device, opt)
    sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    run_epoch(runner, batches[1:], device, opt)
    sync()
    return first, batch * (len(batches) - 1) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", default="small_cnn@64,efficientnet_lite0@128")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} torch thread(s)"
    print(f"{platform.machine()}, torch {torch.__version__}, {where}")
    print("| member | mode | first train step s | train images/s | first val step s | val images/s |")
    print("|---|---|---:|---:|---:|---:|")
    for spec in args.members.split(","):
        arch, size = spec.split("@")
        weights = "DEFAULT" if arch == "efficientnet_lite0" else None  # the installed ImageNet weights
        g = torch.Generator().manual_seed(0)
        shape = (args.batch, 3, int(size), int(size))
        batches = [
            {
                "image": torch.randn(shape, generator=g),
                "label": torch.randint(0, 8, (args.batch,), generator=g),
            }
            for _ in range(args.steps)
        ]
        for compiled in (False, True):
            torch.manual_seed(0)
            model = build_model(arch, classes=8, input_size=int(size), weights=weights)
            model = model.to(device).to(memory_format=torch.channels_last)
            runner = torch.compile(model) if compiled else model
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            model.train()
            train_first, train_rate = timed(runner, batches, device, opt, args.batch)
            val_first, val_rate = timed(runner, batches, device, None, args.batch)
            print(f"| {arch} at {size} | {'compiled' if compiled else 'eager'} | {train_first:.2f} | "
                  f"{train_rate:.0f} | {val_first:.2f} | {val_rate:.0f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
