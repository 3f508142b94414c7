"""``make demo``: generate a small dataset, ingest it on a local Ray instance, print the summary."""

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
    parser.add_argument("--per-class", type=int, default=40)
    args = parser.parse_args()
    start = time.perf_counter()
    data, run = storage.join(args.out, "data"), storage.join(args.out, "run")
    if not storage.exists(storage.join(data, "meta", "train.txt")):
        cli_main(["synth", data, "--classes", str(args.classes), "--per-class", str(args.per_class)])
    code = cli_main(["ingest", data, "--out", run, "--preset", "cpu-small"])
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s; run folder: {run}")
    return code


if __name__ == "__main__":
    sys.exit(main())
