"""The pipeline as Ray jobs on a real multi-node cluster on loopback (``infra/local-cluster.sh``: a head with
1 CPU and a worker with 2, separate Ray nodes). The fault-free run is a ``ray job submit`` of
``jobs.clean`` whose OUT is in S3 (moto's server on loopback, through s3fs, credentials passed in the
job's runtime_env); then the worker node is killed mid-stage, and the driver is killed and the job
re-submitted, each on a local copy of that run.

Training is not bit-for-bit reproducible between two runs (Ray Data delivers blocks in completion
order; augmentation draws afresh), so the fault runs start from a copy of the fault-free run rewound to
before the crop stage: a kill during cropping must leave crops and blacklist equal to the fault-free
run's.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from pipeline import manifests

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "local-cluster.sh"
BIN = Path(sys.executable).parent
# A tiny ensemble: what is tested is scheduling, failures and storage, not accuracy.
# Crop: one actor of 2 CPUs, which only the worker node can hold (the head has 1), one image per batch.
SETS = ["train.members=[{arch: small_cnn, input_size: 32, name: tiny}]", "train.head_epochs=1",
        "train.finetune_epochs=2", "train.folds=0", "crop.baselines=[none]", "crop.batch_size=1",
        "crop.actors=1", "crop.cpus_per_actor=2",
        "crop.max_scale=1.5", "evaluate.epochs=1", "evaluate.retrain=false", "normalize.shard_size=16",
        "evaluate.member={arch: small_cnn, name: outside, input_size: 32}"]  # fmt: skip
NODES = ["--workers", "1", "--head-cpus", "1", "--worker-cpus", "2"]
# Stages after these are removed to rewind a finished run to "trained, not yet cropped".
INGEST_AND_TRAIN = {"sources", "normalize", "dedupe", "split", "train"}
S3_OUT = "s3://bucket/run"

pytestmark = pytest.mark.timeout(900)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@dataclass
class Cluster:
    dir: str
    port: int

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.port + 5}"

    def ctl(self, command: str, *args: str) -> str:
        proc = subprocess.run(
            ["bash", str(SCRIPT), command, *args, "--dir", self.dir, "--port", str(self.port)],
            env=_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def submit(self, module: str, *args: str, env_vars: dict[str, str] | None = None,
               wait: bool = True) -> tuple[str, subprocess.CompletedProcess]:  # fmt: skip
        """``ray job submit`` as a user types it; retried while the fresh head has no job agent yet."""
        job = f"{module.rsplit('.', 1)[-1]}-{uuid.uuid4().hex[:8]}"
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--submission-id", job,
               "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"env_vars": env_vars or {}}),
               *([] if wait else ["--no-wait"]), "--", "python", "-m", module, *args]  # fmt: skip
        for _ in range(30):
            proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=800)
            if "No available agent" not in proc.stdout + proc.stderr:
                return job, proc
            time.sleep(2)
        raise AssertionError(proc.stdout + proc.stderr)

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard)

    def wait(self, job: str, timeout: float = 800) -> str:
        from ray.job_submission import JobStatus

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.client().get_job_status(job)
            if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
                return str(status.value)
            time.sleep(1)
        raise AssertionError(f"job {job} still running after {timeout} s")

    def node_id(self, ip: str) -> str:
        from ray.util.state import list_nodes

        alive = [n for n in list_nodes(address=self.dashboard) if n.node_ip == ip and n.state == "ALIVE"]
        assert alive, f"no live node at {ip}"
        return alive[0].node_id

    def actors_on(self, ip: str) -> list[tuple[str, str]]:
        """(class, repr) of the live actors on the node at ``ip``."""
        from ray.util.state import list_actors

        node = self.node_id(ip)
        actors = list_actors(
            address=self.dashboard, filters=[("state", "=", "ALIVE")], limit=10_000, detail=True
        )
        return [(a.class_name, a.repr_name) for a in actors if a.node_id == node]


def local_cluster(nodes: list[str], ports: range, prefix: str) -> Iterator[Cluster]:
    """A cluster of ``infra/local-cluster.sh`` with ``nodes`` (its start options), on free ports drawn
    from ``ports`` and in a folder ``/tmp/<prefix>-<port>`` (short: Ray keeps unix sockets under it);
    stopped, and its folder removed, when the generator closes."""
    base = next(p for p in (random.randrange(ports.start, ports.stop, 10) for _ in range(100))
                if all(_free(p + k) for k in (0, 1, 5, 14, 16)))  # fmt: skip
    c = Cluster(dir=f"/tmp/{prefix}-{base}", port=base)
    try:
        c.ctl("start", *nodes)
        yield c
    finally:
        c.ctl("stop")
        shutil.rmtree(c.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    yield from local_cluster(NODES, range(20_000, 40_000), "ccl")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("cluster") / "data"
    synthesize(str(root), classes=4, per_class=24, clutter=0.25, seed=5)
    return root


def clean_args(data: Path | str, out: Path | str, *more: str) -> list[str]:
    sets = [*SETS, *more]
    return [str(data), "--out", str(out), "--preset", "cpu-small", *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """moto's S3 server on loopback and the environment that points boto3/s3fs at it."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3
    import s3fs

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"]).create_bucket(Bucket="bucket")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield env
    finally:
        # moto keeps one in-memory store per process, shared by every server it starts: empty it.
        urllib.request.urlopen(urllib.request.Request(f"{env['AWS_ENDPOINT_URL_S3']}/moto-api/reset",
                                                      method="POST"))  # fmt: skip
        server.stop()
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def fault_free(cluster, data, s3, tmp_path_factory) -> Path:
    """``ray job submit ... -- python -m jobs.clean SOURCE --out s3://bucket/run``, no fault; returns a
    local copy of the finished run (the fault runs start from it and are compared with it)."""
    import s3fs

    # The fault runs' settings exactly (one image per crop batch included): their evaluate stage, whose key
    # covers the crop settings, then reuses this run's outside classifier instead of training it again.
    job, proc = cluster.submit("jobs.clean", *clean_args(data, S3_OUT), env_vars=s3)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert cluster.wait(job) == "SUCCEEDED"
    local = tmp_path_factory.mktemp("runs") / "fault-free"
    s3fs.S3FileSystem().get(S3_OUT.removeprefix("s3://"), str(local), recursive=True)
    return local


def read(out: Path | str, name: str) -> pd.DataFrame:
    frame = manifests.read_manifest(name, f"{out}/manifests/{name}.parquet")
    keys = [c for c in ("image_id", "method", "target", "member", "fold") if c in frame.columns]
    return frame.sort_values(keys).reset_index(drop=True)


def assert_same_outputs(a: Path | str, b: Path | str) -> None:
    for name in ("images", "duplicates", "crops", "blacklist"):
        pd.testing.assert_frame_equal(read(a, name), read(b, name), obj=name)


def rewind_to_trained(src: Path, dst: Path) -> None:
    """A copy of a finished run as it stood when training had finished and cropping not begun."""
    shutil.copytree(src, dst)
    for stage in (dst / "stages").iterdir():
        if stage.name not in INGEST_AND_TRAIN:
            shutil.rmtree(stage)
    for later in ("cropped", "export", "report"):
        shutil.rmtree(dst / later, ignore_errors=True)
    for name in ("crops", "blacklist"):
        (dst / "manifests" / f"{name}.parquet").unlink()


def crop_parts(out: Path) -> dict[str, float]:
    """The crop stage's finished batches: judged part file -> mtime."""
    return {str(p): p.stat().st_mtime for p in (out / "stages" / "crop").glob("shards-*/judged-*.parquet")}


def wait_for(predicate, timeout: float = 600, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_submitted_clean_job_runs_on_both_nodes_and_writes_every_manifest(cluster, fault_free):
    from ray.util.state import list_tasks

    out = fault_free
    for name in ("images", "duplicates", "predictions", "crops", "blacklist"):
        assert (out / "manifests" / f"{name}.parquet").exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"ingest", "training", "crop", "evaluation"} <= set(metrics)
    images = read(out, "images")
    crops = read(out, "crops")
    ok = images[(images["status"] == "ok") & images["split"].notna()]
    assert set(crops["image_id"]) == set(ok["image_id"])
    assert any((out / "cropped").rglob("*.jpg"))
    # Work ran on the worker node too, not only on the head.
    worker = cluster.node_id("127.0.0.3")
    tasks = list_tasks(address=cluster.dashboard, filters=[("node_id", "=", worker)], limit=10_000)
    assert tasks, "no task ran on the worker node"


def test_worker_node_killed_mid_crop_costs_only_its_in_flight_batch(cluster, fault_free, data, tmp_path):
    """The node holding the crop actor dies; the job waits, and when a node joins (as the autoscaler
    replaces a lost spot instance) Ray restarts the actor there and Ray Data re-runs the lost batch:
    the outputs are the fault-free run's and the finished batches are kept."""
    from ray.job_submission import JobStatus

    out = tmp_path / "worker-killed"
    rewind_to_trained(fault_free, out)
    cluster.ctl("start", *NODES)  # both nodes up
    job, proc = cluster.submit("jobs.clean", *clean_args(data, out), wait=False)
    assert proc.returncode == 0, proc.stderr

    def worker_is_cropping() -> bool:
        on_worker = [cls for cls, _ in cluster.actors_on("127.0.0.3") if "CropWorker" in cls]
        return bool(on_worker) and len(crop_parts(out)) >= 2

    wait_for(worker_is_cropping, what="the crop actor on the worker and its first finished batches")
    before = crop_parts(out)
    cluster.ctl("kill", "worker-1")
    try:
        time.sleep(5)
        assert cluster.client().get_job_status(job) == JobStatus.RUNNING  # waiting, not failed
        cluster.ctl("start", *NODES)  # the replacement node
        assert cluster.wait(job) == "SUCCEEDED", cluster.client().get_job_logs(job)[-5000:]
    finally:
        cluster.ctl("start", *NODES)
    after = crop_parts(out)
    assert len(before) < len(after), "the crop stage had finished before the kill: the test proved nothing"
    assert all(after.get(p) == m for p, m in before.items()), "finished batches were rewritten"
    assert_same_outputs(fault_free, out)
    # Redone work: images judged twice, at most the batches in flight on the killed actor (Ray Data sends
    # an actor up to 2 at a time; one image each). Outputs are drained as they come, so batches that had
    # finished are not re-run to rebuild blocks lost with the node.
    judged = pd.concat([pd.read_parquet(p) for p in after])
    redone = len(judged) - judged["image_id"].nunique()
    print(f"worker killed with {len(before)} of {len(after)} batches finished; "
          f"{redone} of {judged['image_id'].nunique()} images judged twice")  # fmt: skip
    assert redone <= 2


def test_driver_killed_and_job_resubmitted_redoes_no_finished_work(cluster, fault_free, data, tmp_path):
    out = tmp_path / "driver-killed"
    rewind_to_trained(fault_free, out)
    markers = {p: p.stat().st_mtime for p in (out / "stages").glob("*/_COMPLETE.json")}
    job, proc = cluster.submit("jobs.clean", *clean_args(data, out), wait=False)
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: len(crop_parts(out)) >= 2, what="the first crop batches")
    # The driver is the job's entrypoint process; SIGKILL it as a lost head or OOM would.
    found = subprocess.run(["pgrep", "-f", f"jobs.clean {data} --out {out}"], capture_output=True, text=True)
    pids = found.stdout.split()
    assert pids, "driver process not found"
    subprocess.run(["kill", "-9", *pids], check=True)
    assert cluster.wait(job) == "FAILED"

    def crop_actors_gone() -> bool:  # the driver's actors die with it; their last part file lands before
        return not any(
            "CropWorker" in cls for ip in ("127.0.0.2", "127.0.0.3") for cls, _ in cluster.actors_on(ip)
        )

    wait_for(crop_actors_gone, what="the killed driver's crop actors to end")
    first = crop_parts(out)
    done = pd.concat([pd.read_parquet(p) for p in first])["image_id"].nunique()

    job, proc = cluster.submit("jobs.clean", *clean_args(data, out))
    assert proc.returncode == 0, proc.stdout[-5000:]
    metrics = json.loads((out / "metrics.json").read_text())
    total = metrics["crop"]["images"]
    redone_share = (metrics["crop"]["processed"] - (total - done)) / total
    print(f"driver killed after {done} of {total} images were cropped; the re-submission cropped "
          f"{metrics['crop']['processed']}; finished work redone: {redone_share:.1%}")  # fmt: skip
    assert 0 < done < total, "the kill did not land mid-stage"
    assert metrics["crop"]["processed"] == total - done
    assert all(p.stat().st_mtime == m for p, m in markers.items()), "a finished stage ran again"
    after = crop_parts(out)
    assert all(after.get(p) == m for p, m in first.items()), "finished batches were redone"
    assert_same_outputs(fault_free, out)


def test_whole_run_with_out_in_s3(fault_free, s3):
    """OUT=s3://bucket/run: every stage reads and writes through s3fs; credentials travel in the job's
    runtime_env, never in the config."""
    import s3fs

    fs = s3fs.S3FileSystem()
    for name in ("images", "duplicates", "predictions", "crops", "blacklist"):
        assert fs.exists(f"bucket/run/manifests/{name}.parquet"), name
    assert fs.glob("bucket/run/blobs/*/*.jpg") and fs.glob("bucket/run/cropped/*/*/*.jpg")
    assert fs.exists("bucket/run/models/tiny/best.pt")
    assert fs.exists("bucket/run/report/index.html")
    metrics = json.loads(fs.cat_file("bucket/run/metrics.json"))
    assert {"ingest", "training", "crop", "evaluation"} <= set(metrics)
    # The run's config names where it lives, and holds no credentials.
    run_yaml = fs.cat_file("bucket/run/run.yaml").decode()
    assert S3_OUT in run_yaml and not any(v in run_yaml for k, v in s3.items() if "KEY" in k)
    crops = read(S3_OUT, "crops")
    images = read(S3_OUT, "images")
    ok = images[(images["status"] == "ok") & images["split"].notna()]
    assert set(crops["image_id"]) == set(ok["image_id"])
