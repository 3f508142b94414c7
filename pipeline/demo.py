"""``make demo``: generate a small dataset and clean it on a local Ray instance: ingest, train the ensemble,
crop and blacklist, evaluate, and build the HTML report."""

from __future__ import annotations

import argparse
import sys
import time

from pipeline import storage
from pipeline.cli import main as cli_main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=60)
    # Busy backgrounds with decoys (clutter 1) need far more than a CPU minute of training to tell
    # classes apart from whole images; a quarter of the clutter keeps the demo's classifiers honest.
    parser.add_argument("--clutter", type=float, default=0.25)
    parser.add_argument("--no-train", action="store_true", help="ingest only")
    args = parser.parse_args()
    start = time.perf_counter()
    data, run = storage.join(args.out, "data"), storage.join(args.out, "run")
    if not storage.exists(storage.join(data, "meta", "train.txt")):
        cli_main(["synth", data, "--classes", str(args.classes), "--per-class", str(args.per_class),
                  "--clutter", str(args.clutter)])  # fmt: skip
    if args.no_train:
        code = cli_main(["ingest", data, "--out", run, "--preset", "cpu-small"])
    else:
        code = cli_main(["clean", data, "--out", run, "--preset", "cpu-small"])
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s; run folder: {run}")
    report = storage.join(run, "report", "index.html")
    if storage.exists(report):
        print(f"report: {report}  (open it in a browser, or: python -m http.server -d {run}/report)")
    return code


if __name__ == "__main__":
    sys.exit(main())
