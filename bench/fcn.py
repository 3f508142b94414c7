"""FCN heatmaps against classifying every window one by one: speed and agreement, per member.

For each member (a zoo classifier at training side W, random init, eval mode) and image size:

- FCN: ``convolutionalize(model).heatmap(images)``, one call for the batch of images; cell (i, j) holds
  the class probabilities of one W x W window.
- Windows: every window the FCN's cells stand for, cropped from the image and classified by the
  classifier itself (``softmax(model(crops))``, crops in batches): the naive sliding window.

Where a cell's window is. The trunk is translation-equivariant in steps of its stride s (every
intermediate stride divides s and the padding on the top and left is fixed), so the window of cell
(i, j) is the W x W square at (s*i, s*j), whatever the image size; where the trunk's rounding gives a
last cell whose window sticks out of the image, the crop is zero-filled there. The table reports how
far ``Geometry.centres`` puts each cell's centre from the centre of that window.

Agreement. A lone crop is zero-padded by every padded layer at its own border, where the FCN sees the
real neighbouring pixels, so no cell is expected to match exactly. The trunk's dependence span is
measured, not assumed: trunk cell m depends on input columns a + s*m .. b + s*m (a probe in float64
that perturbs one column at a time); a cell is interior when its window, grown by that margin, stays
inside the image (then the image border's padding cannot reach it). Members with squeeze-and-excitation
blocks pool globally inside the trunk: every cell depends on the whole image, so none is interior and
the FCN is not a sliding window of the classifier at all. As a check of the geometry, each interior
window is also classified with its receptive-field context (the trunk on the window grown by the
margin, its D x D cells pooled, the head): that must match the FCN to float precision.

Random init. The weights are random, but a member straight from init is a poor instrument: with batch
norm at its initial statistics some trunks (MobileNetV3, EfficientNet) give the same logits for every
input, and the heads give near-uniform probabilities (about 1/classes), which would make any
difference look small. So each member is calibrated on random W x W images first (``--no-calibrate``
skips it): batch-norm running statistics measured on them, then the head's last layer shifted and
scaled so that every class's logit has mean 0 and standard deviation ``--logit-std`` (3) over windows.

    python bench/fcn.py [--members small_cnn@48:128x170,resnet18@224:320x427] [--images 4] [--json PATH]
    python bench/fcn.py --device cuda --bf16 --ensemble --images 16 \\
        --members inception_v3@299:512x512,resnet50@299:512x512,vgg16_bn@299:512x512
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.crop.fcn import FCN, convolutionalize
from pipeline.models.zoo import ARCHS, Classifier, build_model

DEFAULT_MEMBERS = ",".join([
    "small_cnn@48:128x170", "small_cnn@64:128x170", "resnet18@224:320x427",
    "mobilenet_v3_large@224:320x427", "efficientnet_b0@224:320x427",
])  # fmt: skip


SHORT_S = 0.3  # a call shorter than this runs several times per timing round


@dataclass
class Result:
    member: str
    arch: str
    window: int
    height: int
    width: int
    images: int
    cells_h: int
    cells_w: int
    fcn_s: float  # best of the timed repeats, for all the images
    windows_s: float
    fcn_images_per_s: float
    windows_images_per_s: float
    speedup: float  # FCN images/s over windows images/s
    margin: list[int] | None  # input pixels the trunk reaches beyond a window, [left, right]; None: global
    interior_cells: int  # per image
    max_diff_interior: float | None  # max |p_fcn - p_window| over interior cells and classes
    max_diff_context: float | None  # the same, windows classified with their receptive-field context
    max_diff_all: float
    mean_diff_all: float  # mean over cells of the max over classes
    top1_agree_all: float  # fraction of cells where FCN and window give the same argmax
    top1_agree_interior: float | None
    shift_max_diff: float  # window against the window moved 1 px right and down, both alone
    shift_mean_diff: float
    shift_top1_agree: float
    centres_off_px: float  # max |Geometry.centres - centre of the cell's window|, both axes
    others_cpu_fcn: float  # share of the machine's CPUs other processes used during the best FCN run
    others_cpu_windows: float
    load_before: float
    load_after: float


def parse_member(spec: str) -> tuple[str, int, int, int]:
    """``arch@W:HxW`` -> (arch, window, image height, image width)."""
    try:
        arch, rest = spec.split("@")
        window, image = rest.split(":")
        height, width = image.lower().split("x")
        return arch, int(window), int(height), int(width)
    except ValueError:
        raise SystemExit(f"bad member {spec!r}; expected arch@W:HxW, e.g. resnet18@224:320x427") from None


def smooth_images(n: int, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Normalized-looking images with structure at several scales (not i.i.d. pixel noise)."""
    coarse = torch.randn(n, 3, max(2, height // 16), max(2, width // 16), generator=gen)
    x = nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    x = x + 0.3 * torch.randn(n, 3, height, width, generator=gen)
    return (x - x.mean()) / x.std()


def calibrate(model: Classifier, logit_std: float, gen: torch.Generator, device: torch.device) -> None:
    """Make a random-init member behave like a trained one where it matters here, keeping its weights:
    batch-norm running statistics measured on random windows (as training leaves them: without this,
    some random trunks give the same logits for every input), then the head's last linear layer shifted
    and scaled so that each class's logit has mean 0 and standard deviation ``logit_std`` over windows
    (so that the input, not a constant, decides the probabilities). Argmax order over the windows is
    preserved by the scale, not by the shift."""
    side = model.input_size
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(smooth_images(16, side, side, gen).to(device))
    model.eval()
    last = [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1]
    with torch.inference_mode():
        logits = model(smooth_images(32, side, side, gen).to(device)).float()
    mean, std = logits.mean(dim=0), float(logits.std(dim=0).mean())
    factor = logit_std / max(std, 1e-12)
    with torch.no_grad():
        if last.bias is None:
            last.bias = nn.Parameter(torch.zeros(last.out_features, device=device))
        last.weight.mul_(factor)
        last.bias.sub_(mean.to(last.bias.dtype)).mul_(factor)


def dependence(model: Classifier, stride: int, device: torch.device) -> tuple[int, int] | None:
    """(a, b): trunk cell m depends on input columns a + stride*m .. b + stride*m. None when every cell
    depends on every column (adaptive pooling inside the trunk, as in squeeze-and-excitation blocks).

    Float64 probe: a batch of ``stride`` inputs, each with one column perturbed at consecutive positions;
    the trunk cells that change pin a and b down to the pixel. Measured along the width; the zoo's
    trunks have square kernels (or 1xk and kx1 in pairs) and symmetric padding, so rows behave alike.
    """
    trunk = copy.deepcopy(model.trunk).to(device=device, dtype=torch.float64).eval()
    height, window = ARCHS[model.arch].min_size, model.input_size
    gen = torch.Generator().manual_seed(1)

    def changed(x: torch.Tensor) -> torch.Tensor:
        """(probe, cell along the width): did perturbing x[1:] change the trunk's output from x[0]'s?"""
        with torch.inference_mode():
            out = trunk(x.to(device)).cpu()
        return (out[1:] - out[:1]).abs().amax(dim=(1, 2)) > 1e-9 * float(out[0].abs().max())

    if any(isinstance(m, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d) for m in trunk.modules()):
        return None  # squeeze-and-excitation: every cell sees the whole input
    width = 2 * window + 4 * stride
    while True:
        cols = [width // 2 + j for j in range(stride)]
        x = torch.randn(1, 3, height, width, generator=gen, dtype=torch.float64).repeat(stride + 1, 1, 1, 1)
        for j, c in enumerate(cols):
            x[j + 1, :, :, c] += 10 * torch.randn(3, height, generator=gen, dtype=torch.float64)
        hit = changed(x)
        if bool(hit[:, 0].any() or hit[:, -1].any()):  # the affected cells reach the border: widen
            if width > 8 * window:
                raise RuntimeError(f"{model.arch}: receptive field wider than {width} px")
            width *= 2
            continue
        lo = [int(row.nonzero()[0]) for row in hit]
        hi = [int(row.nonzero()[-1]) for row in hit]
        # c in [a + s*m, b + s*m] for m in [lo, hi]:
        #   s*lo - s < c - b <= s*lo  and  s*hi <= c - a < s*hi + s
        a_lo = max(c - stride * (m + 1) + 1 for c, m in zip(cols, hi, strict=True))
        a_hi = min(c - stride * m for c, m in zip(cols, hi, strict=True))
        b_lo = max(c - stride * m for c, m in zip(cols, lo, strict=True))
        b_hi = min(c - stride * m + stride - 1 for c, m in zip(cols, lo, strict=True))
        if a_lo != a_hi or b_lo != b_hi:
            print(f"# {model.arch}: dependence span not pinned down (a in [{a_lo}, {a_hi}], b in "
                  f"[{b_lo}, {b_hi}]); using the wider one", flush=True)  # fmt: skip
        return a_lo, b_hi


def interior(length: int, cells: int, stride: int, pool: int, span: tuple[int, int] | None) -> torch.Tensor:
    """Per cell along one axis: does the FCN cell's dependence span stay inside [0, length)?"""
    if span is None:
        return torch.zeros(cells, dtype=torch.bool)
    a, b = span
    start = stride * torch.arange(cells)
    return (start + a >= 0) & (start + stride * (pool - 1) + b <= length - 1)


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far; Linux /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return math.nan, time.process_time()
    busy = sum(fields[:3]) + sum(fields[5:8])  # user nice system (idle iowait) irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK"), time.process_time()


def timed(calls: dict, repeats: int, budget_s: float, sync, patience_s: float = 0.0, quiet: float = 0.1):
    """Each call's best wall time over up to ``repeats`` rounds, the calls interleaved within a round
    (so that load from other processes hits both alike; a short call runs several times in a round, for
    at least ``SHORT_S``); no new round once any call has spent ``budget_s``. With ``patience_s``,
    rounds go on (for up to that many seconds more) until every call has had one run during which other
    processes used under ``quiet`` of the CPUs. Per call: (best seconds, share of the CPUs other
    processes used during that best run, the last output)."""
    best = {k: (math.inf, math.nan, None) for k in calls}
    spent = dict.fromkeys(calls, 0.0)
    calm = dict.fromkeys(calls, False)
    ncpu = os.cpu_count() or 1
    start, rounds = time.monotonic(), 0
    while True:
        for key, fn in calls.items():
            in_round = 0.0
            while in_round < SHORT_S:
                sync()
                machine0, own0 = cpu_seconds()
                t0 = time.perf_counter()
                out = fn()
                sync()
                took = time.perf_counter() - t0
                machine1, own1 = cpu_seconds()
                others = max(0.0, (machine1 - machine0) - (own1 - own0)) / (took * ncpu)
                spent[key], in_round = spent[key] + took, in_round + took
                calm[key] = calm[key] or others < quiet
                best[key] = (took, others, out) if took < best[key][0] else (*best[key][:2], out)
        rounds += 1
        done = rounds >= repeats or max(spent.values()) >= budget_s
        if done and (all(calm.values()) or time.monotonic() - start >= budget_s + patience_s):
            return best


def wait_idle(limit_s: float, threshold: float = 0.1) -> float:
    """Wait (up to ``limit_s``) until other processes use under ``threshold`` of the CPUs over 2 s; the
    last share seen."""
    deadline, share = time.monotonic() + limit_s, math.nan
    while True:
        machine0, own0 = cpu_seconds()
        time.sleep(2.0)
        machine1, own1 = cpu_seconds()
        share = max(0.0, (machine1 - machine0) - (own1 - own0)) / (2.0 * (os.cpu_count() or 1))
        if share < threshold or time.monotonic() >= deadline:
            return share


def bench_member(spec: str, args: argparse.Namespace, device: torch.device) -> Result:
    arch, window, height, width = parse_member(spec)
    if args.wait_idle > 0:
        wait_idle(args.wait_idle)
    load_before = os.getloadavg()[0]
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = build_model(arch, args.classes, input_size=window).to(device).eval()
    if args.calibrate:
        calibrate(model, args.logit_std, gen, device)
    fcn: FCN = convolutionalize(model)
    geo = fcn.geometry
    span = dependence(model, geo.stride, device)
    images = smooth_images(args.images, height, width, gen).to(device)
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model, fcn = model.to(memory_format=fmt), fcn.to(memory_format=fmt)
        images = images.contiguous(memory_format=fmt)
    cast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.bf16 else nullcontext
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def run_fcn() -> torch.Tensor:
        with torch.inference_mode(), cast():
            return fcn.heatmap(images).float()

    with torch.inference_mode():
        probs_fcn = run_fcn()  # warm-up, and the grid
    cells_h, cells_w = probs_fcn.shape[-2:]
    s = geo.stride
    need_h, need_w = s * (cells_h - 1) + window, s * (cells_w - 1) + window  # the last windows' far edges

    def window_probs(idx: range, shift: int = 0) -> torch.Tensor:
        """Every cell's window classified alone (moved ``shift`` pixels right and down)."""
        out = []
        with torch.inference_mode(), cast():
            for n in idx:
                img = images[n : n + 1]
                pad = (0, max(0, need_w + shift - width), 0, max(0, need_h + shift - height))
                if any(pad):  # the trunk's rounding gave a last cell whose window sticks out: zeros there
                    img = nn.functional.pad(img, pad)
                img = img[:, :, shift:, shift:]
                grid = img[0].unfold(1, window, s).unfold(2, window, s)[:, :cells_h, :cells_w]
                crops = grid.permute(1, 2, 0, 3, 4).reshape(cells_h * cells_w, 3, window, window)
                probs = [
                    torch.softmax(
                        model(crops[i : i + args.crop_batch].contiguous(memory_format=fmt)).float(), 1
                    )
                    for i in range(0, len(crops), args.crop_batch)
                ]
                out.append(torch.cat(probs).T.reshape(1, -1, cells_h, cells_w))
        return torch.cat(out)

    window_probs(range(1))  # warm-up: the crop-batch shapes of one image
    calls = {"fcn": run_fcn, "windows": lambda: window_probs(range(args.images))}
    runs = timed(calls, args.repeats, args.budget, sync, patience_s=args.wait_idle)
    (fcn_s, fcn_others, probs_fcn), (windows_s, windows_others, probs_win) = runs["fcn"], runs["windows"]

    diff = (probs_fcn - probs_win).abs().amax(dim=1).cpu()  # (N, h, w)
    agree = (probs_fcn.argmax(1) == probs_win.argmax(1)).cpu()
    # A yardstick for these differences: the same windows moved by one pixel, classified alone.
    probs_shift = window_probs(range(args.images), shift=1)
    shift_diff = (probs_shift - probs_win).abs().amax(dim=1).cpu()
    shift_agree = float((probs_shift.argmax(1) == probs_win.argmax(1)).float().mean())
    rows, cols = interior(height, cells_h, s, geo.pool, span), interior(width, cells_w, s, geo.pool, span)
    inner = rows[:, None] & cols[None, :]
    n_inner = int(inner.sum())
    max_inner = float(diff[:, inner].max()) if n_inner else None
    agree_inner = float(agree[:, inner].float().mean()) if n_inner else None
    max_context = context_check(model, images, probs_fcn, inner, span, geo, cast) if n_inner else None

    true_y = s * torch.arange(cells_h) + (window - 1) / 2
    true_x = s * torch.arange(cells_w) + (window - 1) / 2
    off = max(float((torch.from_numpy(geo.centres(cells_h)) - true_y).abs().max()),
              float((torch.from_numpy(geo.centres(cells_w)) - true_x).abs().max()))  # fmt: skip
    margin = None if span is None else [-span[0], s * (geo.pool - 1) + span[1] - (window - 1)]
    n = args.images
    return Result(
        member=spec, arch=arch, window=window, height=height, width=width, images=n, cells_h=cells_h,
        cells_w=cells_w, fcn_s=fcn_s, windows_s=windows_s, fcn_images_per_s=n / fcn_s,
        windows_images_per_s=n / windows_s, speedup=windows_s / fcn_s, margin=margin,
        interior_cells=n_inner, max_diff_interior=max_inner, max_diff_context=max_context,
        max_diff_all=float(diff.max()), mean_diff_all=float(diff.mean()),
        top1_agree_all=float(agree.float().mean()), top1_agree_interior=agree_inner, centres_off_px=off,
        shift_max_diff=float(shift_diff.max()), shift_mean_diff=float(shift_diff.mean()),
        shift_top1_agree=shift_agree,
        others_cpu_fcn=fcn_others, others_cpu_windows=windows_others, load_before=load_before,
        load_after=os.getloadavg()[0],
    )  # fmt: skip


def context_check(model, images, probs_fcn, inner, span, geo, cast, limit: int = 64) -> float:
    """Max |p_fcn - p| over (up to ``limit``) interior cells of the first image, p being the window
    classified with its receptive-field context: the trunk on the window grown by the margin (the left
    and top rounded up to a whole stride, so the trunk's grid stays aligned), the window's own D x D
    cells average-pooled, the head."""
    s, window, pool = geo.stride, geo.window, geo.pool
    a, b = span
    left = s * math.ceil(max(0, -a) / s)
    right = max(0, s * (pool - 1) + b - (window - 1))
    cells = inner.nonzero().tolist()[:limit]
    side = left + window + right
    crops = torch.stack([images[0, :, s * i - left : s * i - left + side, s * j - left : s * j - left + side]
                         for i, j in cells])  # fmt: skip
    first = left // s
    with torch.inference_mode(), cast():
        feats = model.trunk(crops.contiguous(memory_format=images_format(images)))
        feats = feats[:, :, first : first + pool, first : first + pool]
        logits = model.head(torch.flatten(nn.functional.adaptive_avg_pool2d(feats, 1), 1))
        probs = torch.softmax(logits.float(), 1)
    ref = torch.stack([probs_fcn[0, :, i, j] for i, j in cells])
    return float((probs - ref).abs().max())


def images_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def fmt_diff(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", default=DEFAULT_MEMBERS, help="comma-separated arch@W:HxW")
    parser.add_argument("--images", type=int, default=4, help="images per member (one FCN batch)")
    parser.add_argument("--classes", type=int, default=101)
    parser.add_argument("--crop-batch", type=int, default=64, help="crops per classifier call (windows)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per path; the best counts")
    parser.add_argument("--budget", type=float, default=8.0, help="no new repeat after this many seconds")
    parser.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="batch-norm statistics and head scale measured on random windows (see above)",
    )
    parser.add_argument("--logit-std", type=float, default=3.0, help="per-class logit std over windows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (cuda)")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last memory format (default: on for cuda, off for cpu)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--ensemble",
        action="store_true",
        help="also report the whole ensemble's images/s (members on the same image size)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="before each member, wait up to this many seconds for idle CPUs; then go on timing for up to "
        "this many seconds more until each path has had one run undisturbed by other processes",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.bf16 and device.type != "cuda":
        raise SystemExit("--bf16 needs --device cuda")
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    precision = "bfloat16 autocast" if args.bf16 else "float32"
    load = os.getloadavg()[0]
    print(f"# {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, torch threads "
          f"{args.threads}, GPU: {gpu}, device {device}, {precision}, load {load:.2f}")  # fmt: skip
    results = []
    for spec in args.members.split(","):
        r = bench_member(spec, args, device)
        results.append(r)
        print(f"# {spec}: FCN {r.fcn_images_per_s:.1f} img/s, windows {r.windows_images_per_s:.2f} img/s, "
              f"{r.speedup:.1f}x; top-1 agree {r.top1_agree_all:.2f}", flush=True)  # fmt: skip
    print("\n| member | image | cells | FCN img/s | windows img/s | FCN / windows "
          "| others' CPU % (FCN / windows) |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.arch}@{r.window} | {r.height}x{r.width} | {r.cells_h}x{r.cells_w} | "
              f"{r.fcn_images_per_s:.1f} | {r.windows_images_per_s:.2f} | **{r.speedup:.1f}x** | "
              f"{100 * r.others_cpu_fcn:.0f} / {100 * r.others_cpu_windows:.0f} |")  # fmt: skip
    print("\n| member | image | trunk margin px | interior cells | max Δp interior (context) "
          "| max Δp all (mean) | top-1 agree | 1-px shift: max Δp (mean), top-1 agree "
          "| centres() off px |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        margin = "global" if r.margin is None else f"{r.margin[0]} / {r.margin[1]}"
        inner = f"{fmt_diff(r.max_diff_interior)} ({fmt_diff(r.max_diff_context)})"
        print(f"| {r.arch}@{r.window} | {r.height}x{r.width} | {margin} | {r.interior_cells} | {inner} | "
              f"{fmt_diff(r.max_diff_all)} ({r.mean_diff_all:.2f}) | {r.top1_agree_all:.2f} | "
              f"{fmt_diff(r.shift_max_diff)} ({r.shift_mean_diff:.2f}), {r.shift_top1_agree:.2f} | "
              f"{r.centres_off_px:g} |")  # fmt: skip
    print("\nFCN / windows: " + ", ".join(f"{r.arch}@{r.window} {r.speedup:.1f}x" for r in results))
    ensemble = None
    if args.ensemble:
        fcn_s, win_s = sum(r.fcn_s for r in results), sum(r.windows_s for r in results)
        ensemble = {"members": [r.member for r in results], "images": args.images,
                    "fcn_images_per_s": args.images / fcn_s, "windows_images_per_s": args.images / win_s,
                    "speedup": win_s / fcn_s}  # fmt: skip
        print(
            f"whole ensemble ({len(results)} members): FCN {ensemble['fcn_images_per_s']:.1f} img/s, "
            f"windows {ensemble['windows_images_per_s']:.2f} img/s, {ensemble['speedup']:.1f}x"
        )
    print(f"# load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        doc = {"machine": {"arch": platform.machine(), "processor": platform.processor(),
                           "cpus": os.cpu_count(), "gpu": gpu},
               "args": vars(args), "torch": torch.__version__, "results": [asdict(r) for r in results],
               "ensemble": ensemble}  # fmt: skip
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
