"""The cpu-small preset on the smallest multi-node cluster: two loopback nodes of 1 CPU each
(``infra/local-cluster.sh start --workers 1 --head-cpus 1 --worker-cpus 1``), ``jobs.clean`` submitted as
a user submits it. With the preset's resource settings (two members trained at once, half a CPU per
training worker, 1-CPU crop actors) the job finishes, or fails at once with a line naming what it asked
for and what each node has; it never waits without a word.

Before the stages planned per node, the train stage's two workers took half of each node and the data
tasks feeding them asked for a whole CPU, which no node had (`ray status`: ``Pending Demands: {'CPU':
1.0}: 2+ pending tasks/actors``): the job waited, the cluster idle, until it was killed. A crop actor of
2 CPUs on these nodes waited the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_cluster import Cluster, local_cluster

NODES = ["--workers", "1", "--head-cpus", "1", "--worker-cpus", "1"]
# Tiny training and cropping, the preset's resources untouched: its two members, train.cpus_per_worker
# 0.5, the crop actors of 1 CPU as many as the nodes hold.
SETS = ["train.finetune_epochs=2", "train.folds=0", "crop.baselines=[none]", "crop.max_scale=1.5",
        "evaluate.epochs=1", "evaluate.retrain=false", "normalize.shard_size=16",
        "evaluate.member={arch: small_cnn, name: outside, input_size: 32}"]  # fmt: skip
JOB_TIMEOUT = 1800  # seconds: far above the few minutes the job takes on 2 loaded cores

pytestmark = pytest.mark.timeout(3 * JOB_TIMEOUT)


@dataclass
class Outcome:
    out: Path
    status: str
    logs: str
    seconds: float


def project_tracebacks(logs: str) -> list[str]:
    """Traceback lines in the project's code. A job's logs also carry Ray's own (its Train controller's
    helper actors log timeouts of the state API on a loaded machine): those are not the project's."""
    return [line for line in logs.splitlines() if 'File "' in line and "/pipeline/" in line]


def clean_args(data: Path, out: Path, *more: str) -> list[str]:
    return [
        str(data),
        "--out",
        str(out),
        "--preset",
        "cpu-small",
        *[a for s in [*SETS, *more] for a in ("--set", s)],
    ]


def run_job(cluster: Cluster, data: Path, out: Path, *more: str, timeout: float = JOB_TIMEOUT) -> Outcome:
    start = time.monotonic()
    job, proc = cluster.submit("jobs.clean", *clean_args(data, out, *more), wait=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = cluster.wait(job, timeout=timeout)
    outcome = Outcome(out, status, cluster.client().get_job_logs(job), time.monotonic() - start)
    print(f"job {job}: {status} after {outcome.seconds:.0f} s")
    return outcome


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    yield from local_cluster(NODES, range(42_000, 58_000), "ccs")  # ports apart from test_cluster.py's


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("small-cluster") / "data"
    synthesize(str(root), classes=4, per_class=12, clutter=0.25, seed=5)
    return root


@pytest.fixture(scope="module")
def finished(cluster, data, tmp_path_factory) -> Outcome:
    return run_job(cluster, data, tmp_path_factory.mktemp("runs") / "cpu-small")


def test_cpu_small_preset_finishes_on_two_one_cpu_nodes(finished):
    assert finished.status == "SUCCEEDED", finished.logs[-6000:]
    out = finished.out
    for name in ("images", "predictions", "crops", "blacklist"):
        assert (out / "manifests" / f"{name}.parquet").exists(), name
    for member in ("lite0_128", "small_cnn_64", "_evaluate/outside"):
        assert (out / "models" / member / "best.pt").exists(), member
    assert "no progress for" not in finished.logs  # the stall watchdog never had to speak
    assert not project_tracebacks(finished.logs)


def test_a_crop_actor_no_node_holds_fails_at_once_naming_the_nodes(cluster, data, finished):
    """The finished run again with 2-CPU crop actors: ingest and training are skipped as finished, and the
    crop stage stops before it starts an actor, with one line."""
    outcome = run_job(cluster, data, finished.out, "crop.cpus_per_actor=2", timeout=900)
    assert outcome.status == "FAILED", outcome.logs[-6000:]
    lines = [line for line in outcome.logs.splitlines() if "fits on no node" in line]
    assert len(lines) == 1, outcome.logs[-6000:]
    assert "crop: an actor of 2 CPU (crop.cpus_per_actor)" in lines[0]
    assert "127.0.0.2: 1 CPU; 127.0.0.3: 1 CPU" in lines[0]
    assert not project_tracebacks(outcome.logs)
