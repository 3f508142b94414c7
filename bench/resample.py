"""Resize filters of the normalize stage: CPU per image against quality, on generated and real photos.

For every filter ``normalize.resample`` offers, each image goes through ``normalize_bytes`` (reduced-scale
JPEG decode, the final resize with that filter, pHash, JPEG re-encode at quality 90) and is compared with
a reference made the slow way: the full-size decode resized with Lanczos, not re-encoded.

Reported per filter and target side: ms of one core per image for the whole of ``normalize_bytes`` (best
of three passes), PSNR of the stored JPEG against the reference (mean over images, dB), and how often its
pHash equals the reference's pHash (and the mean Hamming distance): a filter that moves pHashes moves
duplicate groups.

Images: the download benchmark's generated JPEGs (``bench/out/download/data``, made by
``bench/download.py`` when missing; about 467 x 263) and crops of the seven photographs bundled with
scikit-learn and scikit-image (``pipeline.photos``), short sides 160-900 px, JPEG quality 90.

Run: ``python bench/resample.py [--n 300] [--sides 128 256]``.
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from pipeline import photos  # noqa: E402
from pipeline.imaging import FILTERS, Normalized, NormalizeParams, normalize_bytes  # noqa: E402


def generated(n: int) -> list[bytes]:
    import download  # the download benchmark's data, generated on first use

    files = download.ensure_data(n)
    out = []
    for key, _ in files:
        data = (download.DATA / key).read_bytes()
        if data[:2] == b"\xff\xd8":
            out.append(data)
        if len(out) == n:
            break
    return out


def real(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    pictures = [im for _, im in photos.load()]
    out = []
    for i in range(n):
        im = pictures[i % len(pictures)]
        w, h = im.size
        side = int(rng.integers(160, min(900, min(w, h)) + 1))
        aspect = rng.uniform(0.75, 1.5)
        cw, ch = min(w, int(side * max(aspect, 1))), min(h, int(side / min(aspect, 1)))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        buf = io.BytesIO()
        im.crop((x, y, x + cw, y + ch)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def reference(data: bytes, p: NormalizeParams) -> np.ndarray:
    """The full-size decode resized with Lanczos: what the stored image should look like."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    scale = p.target_side / min(w, h)
    if scale < 1:
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def measure(images: list[bytes], side: int) -> list[dict]:
    import imagehash

    rows = []
    refs = [reference(d, NormalizeParams(target_side=side)) for d in images]
    ref_hashes = [imagehash.phash(Image.fromarray(r.astype(np.uint8))) for r in refs]
    for name in FILTERS:
        p = NormalizeParams(target_side=side, resample=name)
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            results = [normalize_bytes(d, p) for d in images]
            best = min(best, time.process_time() - start)
        assert all(isinstance(r, Normalized) for r in results)
        quality, same, bits = [], 0, []
        for r, ref, ref_hash in zip(results, refs, ref_hashes, strict=True):
            stored = np.asarray(Image.open(io.BytesIO(r.jpeg)).convert("RGB"), dtype=np.float64)
            quality.append(psnr(stored, ref))
            distance = imagehash.hex_to_hash(r.phash) - ref_hash
            same += distance == 0
            bits.append(distance)
        rows.append({
            "filter": name, "side": side, "ms": 1e3 * best / len(images), "psnr": float(np.mean(quality)),
            "phash_same": same / len(images), "phash_bits": float(np.mean(bits)),
        })  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=300, help="images of each kind")
    parser.add_argument("--sides", type=int, nargs="+", default=[128, 256])
    args = parser.parse_args()
    print(f"{platform.machine()}, Python {platform.python_version()}, Pillow {Image.__version__}, "
          f"{args.n} images of each kind")  # fmt: skip
    sets = {"generated": generated(args.n), "real photos": real(args.n)}
    print("| images | side | filter | ms / image | PSNR vs full-size Lanczos, dB | pHash equal "
          "| mean pHash bits off |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|")
    for kind, images in sets.items():
        for side in args.sides:
            for r in measure(images, side):
                print(f"| {kind} | {side} | {r['filter']} | {r['ms']:.2f} | {r['psnr']:.2f} | "
                      f"{r['phash_same']:.1%} | {r['phash_bits']:.2f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
