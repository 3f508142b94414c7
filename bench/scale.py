"""Throughput of the ingest (normalize) and crop stages as the cluster grows by nodes.

Layouts, each a real multi-node Ray cluster on loopback (``infra/local-cluster.sh``):

- ``1x1``: one node with 1 CPU;
- ``2x1``: two nodes with 1 CPU each (a node added);
- ``1x2``: one node with 2 CPUs (the same total as 2x1, in one node).

``2x1 / 1x1`` says whether adding a node adds throughput; ``2x1 / 1x2`` what splitting the same cores
over nodes costs. This script is the driver: it connects to each cluster (``RAY_ADDRESS``) and runs the
stages itself. Normalize runs on fresh output each time; crop runs on a copy of one trained run, rewound
to before cropping, so every layout crops with the same models. Layouts run in turn, ``--rounds``
times, and the median is reported.

    python bench/scale.py [--classes 10 --per-class 100 --rounds 2]
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCRIPT = REPO / "infra" / "local-cluster.sh"
LAYOUTS = {"1x1": (0, 1, 1), "2x1": (1, 1, 1), "1x2": (0, 2, 0)}  # workers, head CPUs, worker CPUs
SETS = ["train.members=[{arch: small_cnn, input_size: 48, name: small}]", "train.head_epochs=1",
        "train.finetune_epochs=2", "train.folds=0", "crop.baselines=[none]", "crop.max_scale=1.5",
        "normalize.shard_size=64"]  # fmt: skip


def run_driver(code: str, env: dict[str, str]) -> dict[str, float]:
    """Run stages in a fresh driver process connected to the cluster in ``env``; its JSON result."""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


DRIVER = """
import json, sys, time
sys.path.insert(0, {repo!r})
from pipeline.config import build_config
from pipeline.ingest import ingest_stages
from pipeline.runner import run_stages
from pipeline.stages.crop import CropStage
from pipeline.stages.train import TrainStage
cfg = build_config({{"sources": [{{"uri": {data!r}}}], "out": {out!r}}}, preset="cpu-small", sets={sets!r})
stages = [*ingest_stages(), *([TrainStage(), CropStage()] if {crop!r} else [])]
report = run_stages(cfg, stages)
r = report.results
print(json.dumps({{"normalize_s": r["normalize"].seconds, "crop_s": r["crop"].seconds if {crop!r} else 0,
                   "skipped": report.skipped}}))
"""


def cluster_ctl(command: str, cdir: str, port: int, env: dict[str, str], *more: str) -> None:
    """``infra/local-cluster.sh COMMAND``; a failed start raises."""
    cmd = ["bash", str(SCRIPT), command, "--dir", cdir, "--port", str(port), *more]
    subprocess.run(cmd, env=env, check=command == "start", capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default="bench/out/scale")
    parser.add_argument("--port", type=int, default=27400)
    args = parser.parse_args()

    from pipeline.cli import main as cli_main
    from tests.test_cluster import rewind_to_trained  # the same rewind the fault-tolerance tests use

    work = (REPO / args.work).resolve()
    data, trained = work / "data", work / "trained"
    if not (data / "meta" / "train.txt").exists():
        cli_main(["synth", str(data), "--classes", str(args.classes), "--per-class", str(args.per_class),
                  "--clutter", "0.25"])  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    if not (trained / "models" / "classes.json").exists():  # the shared models: trained on local Ray
        code = DRIVER.format(repo=str(REPO), data=str(data), out=str(trained), sets=SETS, crop=True)
        run_driver(code, env)
    images = _count_images(trained)

    times: dict[str, dict[str, list[float]]] = {n: {"normalize": [], "crop": []} for n in LAYOUTS}
    for _ in range(args.rounds):
        for name, (workers, head_cpus, worker_cpus) in LAYOUTS.items():
            cdir = f"/tmp/ccs-{args.port}"  # short: Ray keeps unix sockets under it
            sizes = [
                "--workers",
                str(workers),
                "--head-cpus",
                str(head_cpus),
                "--worker-cpus",
                str(worker_cpus),
            ]
            cluster_ctl("start", cdir, args.port, env, *sizes)
            try:
                node_env = {**env, "RAY_ADDRESS": f"127.0.0.2:{args.port}"}
                fresh = work / f"ingest-{name}"
                shutil.rmtree(fresh, ignore_errors=True)
                code = DRIVER.format(repo=str(REPO), data=str(data), out=str(fresh), sets=SETS, crop=False)
                times[name]["normalize"].append(run_driver(code, node_env)["normalize_s"])
                rewound = work / f"crop-{name}"
                shutil.rmtree(rewound, ignore_errors=True)
                rewind_to_trained(trained, rewound)
                code = DRIVER.format(repo=str(REPO), data=str(data), out=str(rewound), sets=SETS, crop=True)
                result = run_driver(code, node_env)
                assert "train" in result["skipped"], result  # the shared models, not new ones
                times[name]["crop"].append(result["crop_s"])
            finally:
                cluster_ctl("stop", cdir, args.port, env)
                shutil.rmtree(cdir, ignore_errors=True)

    files = _count_files(data)
    print(
        f"# bench/scale  {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; {files} input files, {images} images cropped; median of {args.rounds}"
    )
    print("| layout | normalize s | normalize images/s | crop s | crop images/s |")
    print("|---|---|---|---|---|")
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    for name in LAYOUTS:
        n, c = med[name]["normalize"], med[name]["crop"]
        print(f"| {name} | {n:.1f} | {files / n:.0f} | {c:.1f} | {images / c:.1f} |")
    for a, b in (("2x1", "1x1"), ("2x1", "1x2")):
        print(f"{a} / {b}: normalize x{med[b]['normalize'] / med[a]['normalize']:.2f}, "
              f"crop x{med[b]['crop'] / med[a]['crop']:.2f} throughput")  # fmt: skip
    return 0


def _count_files(data: Path) -> int:
    return sum(1 for p in (data / "images").rglob("*") if p.is_file())


def _count_images(run: Path) -> int:
    import pandas as pd

    images = pd.read_parquet(run / "manifests" / "images.parquet")
    return int(((images["status"] == "ok") & images["split"].notna()).sum())


if __name__ == "__main__":
    sys.exit(main())
