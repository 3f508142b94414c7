"""The training recipe on real photographs: generate, clean with cpu-small, print the run's key numbers.

Generates a Food-101-layout dataset whose backgrounds are crops of the photographs bundled with
scikit-learn and scikit-image (``cropclean synth --backgrounds real``, see ``pipeline/photos.py``): the
generator's class objects (a third to a half of the short side), ground-truth boxes, label flips,
duplicates and hostile files, on real scenes instead of generated clutter. Then runs
``cropclean clean DATA --out RUN --preset cpu-small`` (ingest, train the ensemble, crop and blacklist,
evaluate) and prints from RUN/metrics.json: each member's val top-1, the blacklist's precision and
recall against the ground truth, how well the crops contain the objects, and Table IV.

    python bench/realphotos.py                        # 10 classes x 126, bench/out/realphotos/
    python bench/realphotos.py --classes 4 --per-class 10 --generate-only
    python bench/realphotos.py --report-only          # the numbers of a finished run again
    python bench/realphotos.py --backgrounds synthetic --out bench/out/synthetic   # on generated clutter

The clean run takes several minutes of 2 cores at the defaults. The data is generated once per set of
arguments (a stamp file in DATA says which); a run interrupted part way resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAMP = "bench-realphotos.json"
MISSING = "-"


def _get(doc: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return MISSING if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def generate(data: Path, args: argparse.Namespace) -> bool:
    """Write the dataset unless DATA already holds one made with the same arguments; whether it wrote."""
    from pipeline.cli import main as cli_main

    wanted = {
        "classes": args.classes,
        "per_class": args.per_class,
        "noise": args.noise,
        "seed": args.seed,
        "clutter": args.clutter,
        "backgrounds": args.backgrounds,
        "object_scale": args.object_scale,
    }
    stamp = data / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        print(f"data: {data} (already generated with these arguments)")
        return False
    if data.exists():
        if not stamp.is_file():
            sys.exit(f"{data} exists and was not made by this script; remove it or pick another --out")
        shutil.rmtree(data)  # made by this script with other arguments
    cmd = ["synth", str(data), "--classes", str(args.classes), "--per-class", str(args.per_class),
           "--noise", str(args.noise), "--seed", str(args.seed), "--clutter", str(args.clutter),
           "--backgrounds", args.backgrounds]  # fmt: skip
    if args.object_scale:
        cmd += ["--object-scale", args.object_scale]
    start = time.perf_counter()
    code = cli_main(cmd)
    if code:
        sys.exit(code)
    stamp.write_text(json.dumps(wanted))
    print(f"generated in {time.perf_counter() - start:.1f}s")
    return True


def clean(data: Path, run: Path, preset: str, sets: list[str]) -> float:
    """``cropclean clean DATA --out RUN --preset PRESET`` in a child process; its wall seconds."""
    cmd = [sys.executable, "-m", "pipeline.cli", "clean", str(data), "--out", str(run), "--preset", preset]
    for s in sets:
        cmd += ["--set", s]
    print("running:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    code = subprocess.call(cmd, cwd=ROOT)
    seconds = time.perf_counter() - start
    if code:
        sys.exit(f"cropclean clean exited with {code} after {seconds:.0f}s")
    return seconds


def report(metrics: dict[str, Any]) -> str:
    """The key numbers of a run's metrics.json as text."""
    lines: list[str] = []
    ingest = metrics.get("ingest", {})
    splits = ingest.get("splits", {})
    lines.append(
        f"images: {ingest.get('images', MISSING)} read, {_get(ingest, 'status.ok') or MISSING} kept "
        f"(train {splits.get('train', MISSING)}, val {splits.get('val', MISSING)}, "
        f"test {splits.get('test', MISSING)}); classes {_get(metrics, 'training.classes') or MISSING}"
    )

    lines.append("\nmembers (val top-1 / top-5 / best epoch of epochs):")
    for name, m in sorted((_get(metrics, "training.members") or {}).items()):
        lines.append(f"  {name:24s} {_num(m.get('val_top1'))} / {_num(m.get('val_top5'))} / "
                     f"{m.get('best_epoch', MISSING)} of {m.get('epochs', MISSING)}")  # fmt: skip

    lines.append("\nblacklist against the ground truth (precision / recall / F1, images flagged):")
    for split in ("all", "train"):
        b = _get(metrics, f"evaluation.quality.blacklist.{split}") or {}
        lines.append(f"  {split}: {b.get('images', MISSING)} images, {b.get('mislabeled', MISSING)} "
                     f"mislabelled, average precision {_num(b.get('average_precision'))}")  # fmt: skip
        for reason in ("all_reasons", "label_not_found"):
            r = b.get(reason) or {}
            lines.append(f"    {reason:16s} {_num(r.get('precision'))} / {_num(r.get('recall'))} / "
                         f"{_num(r.get('f1'))}, {r.get('flagged', MISSING)}")  # fmt: skip
    cl = _get(metrics, "evaluation.quality.cleanlab") or {}
    if cl:
        lines.append(
            f"  cleanlab ({cl.get('split', MISSING)}) {_num(cl.get('precision'))} / "
            f"{_num(cl.get('recall'))} / {_num(cl.get('f1'))}, {cl.get('flagged', MISSING)} flagged"
        )

    lines.append("\ncrops against the object boxes (share containing >= 80% of the object / mean containment"
                 " / mean area fraction / mean IoU):")  # fmt: skip
    crops = _get(metrics, "evaluation.quality.crops") or {}
    for method in sorted(crops, key=lambda m: (m != "fcn_ensemble", m)):
        for mode in ("label", "predicted"):
            r = _get(crops[method], f"{mode}.region") or {}
            if r:
                lines.append(
                    f"  {method:13s} {mode:9s} {_num(r.get('share_containment_ge_80'))} / "
                    f"{_num(r.get('mean_containment'))} / {_num(r.get('mean_area_fraction'))} / "
                    f"{_num(r.get('mean_iou'))}"
                )

    ev = metrics.get("evaluation") or {}
    lines.append(f"\nTable IV: outside classifier ({ev.get('outside_arch', MISSING)}) on "
                 f"{ev.get('test_images', MISSING)} test images (top-1 / top-5):")  # fmt: skip
    rows = [
        ("original", "original"),
        ("cropped, label-driven", "cropped_label_driven"),
        ("cropped, label-free", "cropped_label_free"),
        ("cropped, retrained", "cropped_retrained"),
    ]
    for title, key in rows:
        lines.append(f"  {title:24s} {_num(ev.get(f'top1_{key}'), 4)} / {_num(ev.get(f'top5_{key}'), 4)}")
    for name, b in sorted((ev.get("baselines") or {}).items()):
        lines.append(f"  baseline {name:15s} label-driven {_num(b.get('top1_label_driven'), 4)} / "
                     f"{_num(b.get('top5_label_driven'), 4)}, label-free {_num(b.get('top1_label_free'), 4)}"
                     f" / {_num(b.get('top5_label_free'), 4)}")  # fmt: skip
    top1, free = ev.get("top1_original"), ev.get("top1_cropped_label_free")
    if isinstance(top1, float) and isinstance(free, float):
        lines.append(f"  label-free gain: {100 * (free - top1):+.1f} points top-1")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/realphotos",
                        help="working folder: DATA is OUT/data, RUN is OUT/run")  # fmt: skip
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=126)
    parser.add_argument("--noise", type=float, default=0.1, help="label-flip rate in train")
    parser.add_argument("--seed", type=int, default=0)
    # As in `make demo`: a quarter of the clutter, which on photos means about one decoy object per
    # image; 0 leaves photo and object alone.
    parser.add_argument(
        "--clutter", type=float, default=0.25, help="as make demo; on photos it sets the decoy objects only"
    )
    parser.add_argument("--backgrounds", choices=["real", "synthetic"], default="real")
    parser.add_argument("--object-scale", metavar="LOW,HIGH",
                        help="object side as a share of the short side (default: the generator's, "
                        "1/3 to 1/2 on photos)")  # fmt: skip
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="passed on to cropclean clean (repeatable)")  # fmt: skip
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--generate-only", action="store_true", help="write DATA and stop")
    mode.add_argument("--report-only", action="store_true", help="print the numbers of RUN and stop")
    mode.add_argument("--fresh", action="store_true", help="delete RUN first (DATA is kept if it fits)")
    args = parser.parse_args()

    data, run = args.out / "data", args.out / "run"
    seconds = None
    if not args.report_only:
        wrote = generate(data, args)
        if args.generate_only:
            return 0
        if args.fresh and run.exists():
            shutil.rmtree(run)
        elif wrote and run.exists():
            sys.exit(f"{run} holds a run of other data; add --fresh to delete it")
        seconds = clean(data, run, args.preset, args.sets)
    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        sys.exit(f"{metrics_path}: no such file (run without --report-only first)")
    print(f"\nrun: {run}" + (f" (clean took {seconds:.0f}s)" if seconds is not None else ""))
    print(report(json.loads(metrics_path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
