"""What a preset's run on a dataset computes, counted in FLOPs: a basis for sizing a GPU cluster.

Nothing here is timed. Forward FLOPs are counted by torch's FlopCounterMode on the meta device (no
weights, no data, no device needed): each member's forward pass at its input size, and its FCN over the
preset's image pyramid for one image of the given size (the crop stage: at every scale the image is
resized so that the scale's window becomes the member's window). A training step is taken as 3 forward
passes (backward about 2), a head-only step (pass 1, trunk frozen) as 1. The totals multiply these by
the dataset's image counts and the preset's epochs, every epoch run (early stopping only shortens pass
2). Hours follow for sustained rates given with --tflops: assumptions, to be replaced by measured ones.

``--achieved`` turns measured images/s (docs/benchmarks.md) into the TFLOP/s they amount to:
``fcn:ARCH@W:HxW=IMG_PER_S`` for an FCN pass over one image, ``train:ARCH@W=IMG_PER_S`` for
training steps.

    python bench/sizing.py --preset food101 --train 75750 --test 25250 --image 384x512 --tflops 10,25,50 \\
        --achieved fcn:resnet18@224:320x427=22.1,train:resnet18@48=51
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import MemberConfig, build_config
from pipeline.crop.fcn import convolutionalize
from pipeline.crop.pyramid import pyramid
from pipeline.models.zoo import ARCHS, build_model

CLASSES = 101


def counted(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def forward_flops(arch: str, size: int, shape: tuple[int, int] | None = None, head: str = "linear",
                  classes: int = CLASSES) -> float:  # fmt: skip
    """Forward FLOPs of one image: the classifier at size x size, or its FCN on an image of ``shape``
    (height, width)."""
    with torch.device("meta"), torch.no_grad():
        model = build_model(arch, classes, head=head, weights=None, input_size=size).eval()
        if shape is None:
            return counted(lambda: model(torch.empty(1, 3, size, size)))
        fcn = convolutionalize(model)
        return counted(lambda: fcn(torch.empty(1, 3, *shape)))


def member_flops(m: MemberConfig, image: tuple[int, int], scales: list) -> dict[str, float]:
    size = m.input_size or ARCHS[m.arch].default_size
    h, w = image
    forward = forward_flops(m.arch, size, head=m.head)
    crop = sum(
        forward_flops(m.arch, size, (round(h * size / s.side), round(w * size / s.side)), m.head)
        for s in scales
    )
    return {"input_size": size, "train": 3 * forward, "head": forward, "forward": forward, "crop": crop}


def achieved(spec: str) -> str:
    kind, _, rest = spec.partition(":")
    what, _, rate = rest.rpartition("=")
    arch, _, geometry = what.partition("@")
    size, _, shape = geometry.partition(":")
    if kind == "fcn":
        h, w = (int(v) for v in shape.split("x"))
        flops = forward_flops(arch, int(size), (h, w))
    elif kind == "train":
        flops = 3 * forward_flops(arch, int(size))
    else:
        raise SystemExit(f"--achieved: {spec!r}: give fcn:ARCH@W:HxW=RATE or train:ARCH@W=RATE")
    return f"{spec}: {flops / 1e9:.2f} GFLOP per image, {float(rate) * flops / 1e12:.3f} TFLOP/s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="food101")
    ap.add_argument("--train", type=int, default=75_750, help="images in the dataset's train split")
    ap.add_argument("--test", type=int, default=25_250, help="images in the test split")
    ap.add_argument("--image", default="384x512", help="HxW (height x width) of a normalized image")
    ap.add_argument("--tflops", default="10,25,50", help="sustained TFLOP/s per GPU to convert to hours")
    ap.add_argument("--achieved", default="", help="measured rates to convert, comma-separated (see above)")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()

    cfg = build_config({"sources": [{"uri": "unused"}], "out": "unused"}, preset=args.preset)
    t, c = cfg.train, cfg.crop
    h, w = (int(v) for v in args.image.split("x"))
    members = list(t.members)
    window = max(m.input_size or ARCHS[m.arch].default_size for m in members)
    scales = pyramid(min(w, h), window, c.scale_factor, c.max_scale)
    val = round(args.train * cfg.split.val_from_train)
    fit = args.train - val
    everything = args.train + args.test

    def training(flops: dict[str, float], epochs_head: int, epochs_ft: int, predict: int) -> float:
        per_epoch_val = val * flops["forward"]
        return (epochs_head * (fit * flops["head"] + per_epoch_val)
                + epochs_ft * (fit * flops["train"] + per_epoch_val)
                + predict * flops["forward"])  # fmt: skip

    rows, stages = {}, {"train": 0.0, "crop": 0.0, "evaluate": 0.0}
    for m in members:
        f = member_flops(m, (h, w), scales)
        rows[m.label] = f
        models = 1 + t.folds  # full-data model and K fold models (each on (K-1)/K of train)
        share = 1 if not t.folds else (1 + (t.folds - 1)) / models
        stages["train"] += models * share * training(f, t.head_epochs, t.finetune_epochs, everything)
        stages["crop"] += everything * f["crop"]
    outside = member_flops(cfg.evaluate.member, (h, w), scales)
    rows[f"{cfg.evaluate.member.label} (evaluate)"] = {**outside, "crop": float("nan")}  # it never crops
    ft = cfg.evaluate.epochs or t.finetune_epochs
    trainings = 2 if cfg.evaluate.retrain else 1
    # Each outside model predicts the test images: original, and cropped with and without the label.
    stages["evaluate"] = trainings * training(outside, t.head_epochs, ft, 3 * args.test)

    factors = f"{scales[0].factor:.2f} .. {scales[-1].factor:.2f}"
    print(f"preset {args.preset}: {len(members)} members, {fit} train + {val} val + {args.test} test images; "
          f"{args.image}: {len(scales)} scales (factors {factors})")  # fmt: skip
    print("\nGFLOP per image     input  train step  head step  forward  crop (FCN, all scales)")
    for name, f in rows.items():
        print(f"{name:<20} {f['input_size']:>5} {f['train'] / 1e9:>11.1f} {f['head'] / 1e9:>10.1f} "
              f"{f['forward'] / 1e9:>8.1f} {f['crop'] / 1e9:>9.1f}")  # fmt: skip
    rates = [float(r) for r in args.tflops.split(",")]
    print("\nstage       PFLOP  " + "  ".join(f"GPU-h at {r:g} TFLOP/s" for r in rates))
    for name, flops in [*stages.items(), ("all", sum(stages.values()))]:
        hours = "  ".join(f"{flops / (r * 1e12) / 3600:>20.1f}" for r in rates)
        print(f"{name:<10} {flops / 1e15:>6.0f}  {hours}")
    for spec in filter(None, args.achieved.split(",")):
        print(achieved(spec))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"members": rows, "stages_flops": stages, "scales": len(scales)}, fh, indent=2)


if __name__ == "__main__":
    main()
