"""Training input path: batched augmentation on the worker's device against the per-image path it replaced.

The per-image path (cropclean before 2026-12-05, kept here as the peer): Ray Data re-ran a
``map_batches`` task every epoch that pushed each decoded uint8 image through torchvision v2's
RandomResizedCrop (antialiased), RandomHorizontalFlip and ColorJitter one by one, and shipped normalized
float32 batches to the training worker. The batched path (``pipeline.models.augment``): the worker reads
the cached uint8 batches and augments each whole batch in two passes over its pixels, on its device.

Two measurements, both on real images (the bundled photos of scikit-learn and scikit-image, random
crops of them decoded at the input size x 8/7, as training decodes):

1. **per core**: images/s of the augmentation alone, one thread, same batches, in one process;
2. **an epoch's input through Ray Data** on a local Ray instance: the old path's per-epoch task against
   iterating the cached uint8 blocks and augmenting in the consumer; images/s of one epoch's batches as
   the training worker receives them (no model), and on CUDA, when there is one, the batched path on
   the GPU.

    python bench/augment.py [--size 128] [--images 4096] [--batch 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models.augment import MEAN, STD, Augment, augment_images
from pipeline.photos import load as bundled_photos


def per_image(batch: dict[str, np.ndarray], *, size: int, augment: Augment) -> dict[str, np.ndarray]:
    """The replaced path, as it was: torchvision v2 one image at a time, then normalize."""
    steps: list[Any] = [v2.RandomResizedCrop(size, scale=augment.crop_scale, antialias=True)]
    if augment.flip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.color_jitter:
        j = augment.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    transform = v2.Compose(steps)
    images = torch.from_numpy(batch["image"])
    augmented = torch.stack([transform(img) for img in images]).float() / 255.0
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return {"image": ((augmented - mean) / std).numpy(), "label": batch["label"]}


def decoded_images(n: int, side: int, seed: int = 0) -> np.ndarray:
    """n uint8 (3, side, side) crops of the bundled real photos, as training decodes them."""
    rng = np.random.default_rng(seed)
    photos = [np.asarray(photo) for _, photo in bundled_photos()]
    out = np.empty((n, 3, side, side), dtype=np.uint8)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        s = int(rng.integers(min(h, w) // 3, min(h, w)))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        crop = Image.fromarray(photo[y : y + s, x : x + s]).resize((side, side), Image.Resampling.BILINEAR)
        out[i] = np.asarray(crop).transpose(2, 0, 1)
    return out


def per_core(images: np.ndarray, size: int, batch: int, augment: Augment, repeats: int) -> dict[str, float]:
    """Images/s of each path's augmentation on one thread, best of ``repeats``."""
    torch.set_num_threads(1)
    n = len(images)
    labels = np.zeros(n, dtype=np.int64)
    tensor = torch.from_numpy(images)
    rates: dict[str, float] = {"per_image": 0.0, "batched": 0.0}
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, n, batch):
            per_image(
                {"image": images[i : i + batch], "label": labels[i : i + batch]}, size=size, augment=augment
            )
        rates["per_image"] = max(rates["per_image"], n / (time.perf_counter() - start))
        g = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for i in range(0, n, batch):
            augment_images(tensor[i : i + batch], size, augment, g)
        rates["batched"] = max(rates["batched"], n / (time.perf_counter() - start))
    return rates


def through_ray(
    images: np.ndarray, size: int, batch: int, augment: Augment, repeats: int
) -> dict[str, float]:
    """Images/s of one epoch's input as a training worker receives it, through Ray Data on local Ray."""
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        blocks = [images[i : i + batch] for i in range(0, len(images), batch)]  # as training's decode tasks
        ds = ray.data.from_numpy(blocks).map_batches(
            lambda b: {"image": b["data"], "label": np.zeros(len(b["data"]), dtype=np.int64)},
            batch_format="numpy",
        ).materialize()  # fmt: skip
        n = len(images)
        torch.set_num_threads(1)
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        rates: dict[str, float] = {}
        for _ in range(repeats):
            epoch = ds.map_batches(per_image, batch_size=batch, batch_format="numpy",
                                   fn_kwargs={"size": size, "augment": augment})  # fmt: skip
            start = time.perf_counter()
            for b in epoch.iter_torch_batches(batch_size=batch):
                b["image"].sum()
            rates["per_image"] = max(rates.get("per_image", 0.0), n / (time.perf_counter() - start))
            for device in devices:
                g = torch.Generator().manual_seed(0)
                start = time.perf_counter()
                for b in ds.iter_torch_batches(batch_size=batch, device=str(device)):
                    augment_images(b["image"], size, augment, g).sum()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                key = f"batched_{device.type}"
                rates[key] = max(rates.get(key, 0.0), n / (time.perf_counter() - start))
        return rates
    finally:
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=128, help="input size (decoded at size x 8/7)")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crop-min", type=float, default=0.3, help="least crop area (cpu-small: 0.3)")
    args = parser.parse_args()
    side = round(args.size * 8 / 7)
    augment = Augment(flip=True, crop_scale=(args.crop_min, 1.0), color_jitter=0.2)
    images = decoded_images(args.images, side)
    print(f"{platform.node()} {os.cpu_count()} CPUs, torch {torch.__version__}; {args.images} real-photo "
          f"crops decoded at {side} px -> {args.size} px, batches of {args.batch}, "
          f"best of {args.repeats}")  # fmt: skip
    core = per_core(images, args.size, args.batch, augment, args.repeats)
    print(f"\nper core (1 thread): per-image {core['per_image']:.0f} images/s, batched {core['batched']:.0f} "
          f"images/s: {core['batched'] / core['per_image']:.2f}x")  # fmt: skip
    ray_rates = through_ray(images, args.size, args.batch, augment, args.repeats)
    print(f"\nan epoch's input through Ray Data ({os.cpu_count()} CPUs):")
    for key, rate in ray_rates.items():
        ratio = rate / ray_rates["per_image"]
        print(f"  {key:<14} {rate:8.0f} images/s  {ratio:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
