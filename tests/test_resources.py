"""Resources planned against the cluster's nodes, the stall watchdog's message and decisions, and a local
Ray instance that `ray start` left running. The planning and the watchdog are tested with made-up nodes
and cluster states (no Ray, no clock); one test starts a real `ray start --head` in a private temp dir."""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from pipeline.actor_pool import default_actors, pool_size
from pipeline.config import ConfigError, RayConfig
from pipeline.models.fit import check_room, concurrency, data_cpus
from pipeline.resources import (
    Node,
    PlacementError,
    Request,
    describe_nodes,
    fit_count,
    place,
    require_task_cpus,
    task_cpus,
)
from pipeline.watchdog import ClusterState, Demand, NodeFree, Watchdog, stall_message, state_from_status
from tests.conftest import ingest_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TWO_ONE_CPU_NODES = [Node("127.0.0.2", 1), Node("127.0.0.3", 1)]


def cpu_small(*sets: str):
    return ingest_config("data", "out", *sets)


# --------------------------------------------------------------------------------------------- planning


def test_the_cpu_small_preset_on_two_one_cpu_nodes_gets_data_tasks_that_fit_beside_its_workers():
    """The reported hang: two half-CPU workers, one per node, and data tasks of a whole CPU that no node
    has. The cluster's total (2 CPUs) says there is room; the nodes say half a CPU each."""
    cfg = cpu_small()
    workers = Request("training worker", 0.5, count=2)
    plan = place(TWO_ONE_CPU_NODES, [workers])
    assert sorted(plan.on) == ["127.0.0.2", "127.0.0.3"]  # spread, as Ray placed them
    assert plan.free_cpus == [0.5, 0.5]
    assert task_cpus(TWO_ONE_CPU_NODES, [workers], want=1.0, least=1.0) is None  # a whole CPU: never
    assert concurrency(cfg, 2, TWO_ONE_CPU_NODES, gpu=False) == 2
    assert data_cpus(cfg, 2, TWO_ONE_CPU_NODES, gpu=False) == 0.5  # each data task asks for half a CPU
    check_room(cfg, TWO_ONE_CPU_NODES, gpu=False)  # one training fits, with room for its data
    # On one 2-CPU node the same trainings leave a whole CPU: the data tasks ask for one, as before.
    assert data_cpus(cfg, 2, [Node("big", 2)], gpu=False) == 1.0


def test_placement_goes_largest_first_to_the_node_with_most_room_and_stops_at_what_fits_nowhere():
    nodes = [Node("a", 4), Node("b", 2), Node("gpu", 8, gpus=1)]
    plan = place(nodes, [Request("task", 1, count=3), Request("worker", 2, gpus=1)])
    assert plan.placed and plan.on[0] == "gpu"  # the GPU unit first, on the only GPU node
    # Then each task where most is free: the GPU node (6, then 5), then a (4 ties with the GPU node's 4).
    assert plan.free_cpus == [3, 2, 4] and plan.free_gpus == [0, 0, 0]
    too_big = place(nodes, [Request("actor", 9)])
    assert not too_big.placed and too_big.unplaced == Request("actor", 9)
    second_gpu = place(nodes, [Request("worker", 1, gpus=1, count=2)])
    assert not second_gpu.placed and second_gpu.unplaced.gpus == 1
    assert place([], [Request("anything", 0.1)]).unplaced is not None
    assert place([], []).placed  # nothing asked: nothing to place


def test_what_a_node_holds_counts_per_node_not_in_total():
    assert fit_count([Node("a", 1.5), Node("b", 0.5)], cpus=1) == 1  # the totals say 2
    assert fit_count([Node("a", 8, 1), Node("b", 8, 1)], cpus=1, gpus=0.5) == 4
    assert fit_count([Node("a", 8, 1), Node("b", 8, 1)], cpus=4, gpus=0.5) == 4
    assert fit_count([Node("a", 3, 1)], cpus=2, gpus=0.5) == 1  # its CPUs hold one, its GPU two
    assert fit_count([Node("head", 0), Node("w", 2)], cpus=2) == 1
    cfg = cpu_small("crop.cpus_per_actor=2")
    assert default_actors(cfg.crop, TWO_ONE_CPU_NODES, gpu=False) == 0
    assert default_actors(cpu_small().crop, TWO_ONE_CPU_NODES, gpu=False) == 2
    assert default_actors(cpu_small().crop, {"CPU": 3}, gpu=False) == 3  # a mapping of totals: one node


def test_concurrency_steps_down_until_the_data_tasks_have_a_node():
    """Two GPU nodes of one CPU each: two trainings would take both CPUs and leave no node to decode on."""
    nodes = [Node("g1", 1, gpus=1), Node("g2", 1, gpus=1)]
    cfg = cpu_small("train.cpus_per_worker=1")
    assert concurrency(cfg, 2, nodes, gpu=True) == 1
    assert data_cpus(cfg, 1, nodes, gpu=True) == 1.0
    # The totals hide it: 2 GPUs for two trainings.
    assert concurrency(cfg, 2, {"CPU": 2, "GPU": 2}, gpu=True) == 1
    assert concurrency(cfg, 2, [*nodes, Node("cpu", 4)], gpu=True) == 2


def test_a_training_or_an_actor_that_fits_no_node_is_a_one_line_error_naming_the_request_and_each_node():
    with pytest.raises(PlacementError) as err:
        check_room(cpu_small("train.cpus_per_worker=1.5"), TWO_ONE_CPU_NODES, gpu=False)
    message = str(err.value)
    assert isinstance(err.value, ConfigError) and "\n" not in message  # the CLI prints it as one line
    assert "1.5 CPU" in message and "127.0.0.2: 1 CPU; 127.0.0.3: 1 CPU" in message
    assert "train.cpus_per_worker" in message
    # A worker that takes a whole node leaves the data tasks nothing.
    with pytest.raises(PlacementError, match=r"leave less than 0\.25 CPU on every node"):
        check_room(cpu_small("train.cpus_per_worker=1"), [Node("only", 1)], gpu=False)
    with pytest.raises(PlacementError, match=r"GPU.*127\.0\.0\.2: 1 CPU"):
        check_room(cpu_small(), TWO_ONE_CPU_NODES, gpu=True)

    with pytest.raises(PlacementError) as err:
        pool_size(cpu_small("crop.cpus_per_actor=2").crop, TWO_ONE_CPU_NODES, gpu=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith("crop: ")
    assert "2 CPU" in message and "crop.cpus_per_actor" in message and "127.0.0.3: 1 CPU" in message


def test_concurrent_members_must_leave_a_node_room_for_the_data_tasks():
    three = cpu_small("train.concurrent_members=3", "train.cpus_per_worker=0.5")
    assert concurrency(three, 4, [Node("n", 2)], False) == 3  # half a CPU left: the data tasks take it
    with pytest.raises(PlacementError, match=r"train\.concurrent_members 3 .* 1\.5 CPUs.*n: 1\.5 CPU"):
        concurrency(three, 4, [Node("n", 1.5)], False)


def test_more_actors_than_the_nodes_hold_start_as_many_as_fit_with_a_warning(caplog):
    cfg = cpu_small("crop.actors=5")
    with caplog.at_level(logging.WARNING, logger="cropclean"):
        assert pool_size(cfg.crop, TWO_ONE_CPU_NODES, gpu=False) == 2
    assert "crop.actors is 5 but the nodes hold 2" in caplog.text
    assert pool_size(cpu_small("crop.actors=1").crop, TWO_ONE_CPU_NODES, gpu=False) == 1
    assert pool_size(cpu_small().crop, TWO_ONE_CPU_NODES, gpu=False) == 2


def test_plain_tasks_take_a_whole_cpu_or_what_the_largest_node_has():
    assert require_task_cpus("normalize", [Node("head", 0), Node("w", 4)]) == 1.0
    assert require_task_cpus("normalize", [Node("small", 0.5)]) == 0.5
    with pytest.raises(PlacementError, match=r"^normalize: .*head: 0 CPU"):
        require_task_cpus("normalize", [Node("head", 0)])
    assert describe_nodes([Node("a", 8, 1)]) == "a: 8 CPU and 1 GPU"
    assert describe_nodes([]) == "no live nodes"


# --------------------------------------------------------------------------------------------- watchdog

STUCK = ClusterState(
    nodes=(NodeFree("127.0.0.2", 1, 0.5, store_free=7e9), NodeFree("127.0.0.3", 1, 0.5, store_free=7e9)),
    demands=(Demand("task/actor", (("CPU", 1.0),), 2),),
)


def test_the_stall_message_names_what_waits_and_what_each_node_has_free():
    message = stall_message("train", 612.4, STUCK)
    assert "\n" not in message and message.startswith("stage train: no progress for 612 s")
    assert "2 x {CPU: 1} (task/actor)" in message
    assert "127.0.0.2: 0.5 of 1 CPU; 127.0.0.3: 0.5 of 1 CPU" in message
    assert "ray.stall_timeout" in message and "ray.stall_fail" in message
    gpu = ClusterState((NodeFree("g", 8, 7, gpus=1, free_gpus=0),),
                       (Demand("placement group", (("CPU", 1.0), ("GPU", 1.0)), 1),))  # fmt: skip
    assert "1 x {CPU: 1, GPU: 1} (placement group)" in stall_message("crop", 60, gpu)
    assert "g: 7 of 8 CPU, 0 of 1 GPU" in stall_message("crop", 60, gpu)


def test_the_cluster_state_is_read_from_the_autoscalers_status():
    """Ray's own status types, as `ray status` reads them: placement-group resources, per-node names and
    the autoscaler requests Ray Train makes (not waits) are left out."""
    from ray.autoscaler.v2 import schema as s

    def node(ip: str, cpu_used: float, gpu: float = 0) -> s.NodeInfo:
        usage = [
            s.ResourceUsage("CPU", 1.0, cpu_used),
            s.ResourceUsage("object_store_memory", 1e9, 1e6),
            s.ResourceUsage("CPU_group_0_abc", 0.5, 0.5),  # a placement group's share: left out
            s.ResourceUsage(f"node:{ip}", 1, 0),
        ]
        if gpu:
            usage.append(s.ResourceUsage("GPU", gpu, 0))
        return s.NodeInfo("", "", "", ip, "RUNNING", ip[-1] * 8, s.NodeUsage(usage, 0))  # fmt: skip

    hint = s.ClusterConstraintDemand([s.ResourceRequestByCount({"CPU": 0.5}, 2)])  # request_resources()
    status = s.ClusterStatus(
        active_nodes=[node("127.0.0.3", 0.5, gpu=1)], idle_nodes=[node("127.0.0.2", 0.5)],
        resource_demands=s.ResourceDemandSummary(
            placement_group_demand=[s.PlacementGroupResourceDemand(
                [s.ResourceRequestByCount({"CPU": 0.5, "GPU": 1}, 1)], details="abc:PACK|PENDING")],
            ray_task_actor_demand=[s.RayTaskActorDemand([s.ResourceRequestByCount({"CPU": 1.0}, 2)])],
            cluster_constraint_demand=[hint],
        ),
    )  # fmt: skip
    state = state_from_status(status)
    assert [n.name for n in state.nodes] == ["127.0.0.2", "127.0.0.3"]
    assert state.nodes[1] == NodeFree("127.0.0.3", 1.0, 0.5, 1.0, 1.0, 1e9 - 1e6)
    assert state.demands == (Demand("task/actor", (("CPU", 1.0),), 2),
                             Demand("placement group", (("CPU", 0.5), ("GPU", 1.0)), 1))  # fmt: skip


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_watchdog_speaks_only_when_something_waits_and_nothing_moves_for_the_whole_timeout():
    clock, states = FakeClock(), [STUCK]
    dog = Watchdog("train", timeout=600, probe=lambda: states[-1], clock=clock)
    assert dog.check() is None  # first look
    clock.now = 599
    assert dog.check() is None
    clock.now = 601
    message = dog.check()
    assert message and "no progress for 601 s" in message and "2 x {CPU: 1}" in message
    clock.now = 700
    assert dog.check() is None  # said once; the next after another full timeout
    clock.now = 1202
    assert dog.check() is not None

    # Anything that moves (a node's free object store: blocks come and go) starts the wait afresh.
    moved = ClusterState((NodeFree("127.0.0.2", 1, 0.5, store_free=6e9), *STUCK.nodes[1:]), STUCK.demands)
    states.append(moved)
    clock.now = 1300
    assert dog.check() is None
    clock.now = 1850
    assert dog.check() is None
    clock.now = 1901
    assert dog.check() is not None

    # Nothing pending: a long, busy stage (one epoch on a GPU) never trips it.
    idle = ClusterState(STUCK.nodes, ())
    calm = Watchdog("train", timeout=10, probe=lambda: idle, clock=clock)
    for t in range(0, 10_000, 100):
        clock.now = t
        assert calm.check() is None


def test_the_watchdog_ignores_polls_it_cannot_read():
    clock = FakeClock()

    def broken() -> ClusterState:
        raise ConnectionError("GCS restarting")

    dog = Watchdog("crop", timeout=5, probe=broken, clock=clock)
    clock.now = 100
    assert dog.check() is None
    assert Watchdog("crop", timeout=5, probe=lambda: None, clock=clock).check() is None


def test_the_watchdog_thread_hands_its_message_over_and_a_zero_timeout_starts_none():
    said: list[str] = []
    heard = threading.Event()
    clock = FakeClock()

    def probe() -> ClusterState:
        clock.now += 1000  # every poll is a long time after the last: no real waiting in the test
        return STUCK

    def on_stall(message: str) -> None:
        said.append(message)
        heard.set()

    with Watchdog("train", timeout=1, probe=probe, on_stall=on_stall, clock=clock):
        assert heard.wait(120), "the watchdog thread never reported"
    assert said and said[0].startswith("stage train: no progress")
    off = Watchdog("train", timeout=0, probe=probe, on_stall=on_stall)
    with off:
        assert off._thread is None


@pytest.mark.timeout(600)
def test_the_watchdog_reads_a_real_clusters_pending_demand(ray_local):
    """A task no node can hold (3 CPUs on a 2-CPU instance) waits forever; the watchdog, reading the
    cluster as `ray status` does, names it and the node's free CPUs."""
    ray = ray_local
    heard = threading.Event()
    said: list[str] = []

    @ray.remote(num_cpus=3)
    def too_big() -> None:
        pass

    def on_stall(message: str) -> None:
        said.append(message)
        heard.set()

    ref = too_big.remote()
    try:
        with Watchdog("probe", timeout=2, on_stall=on_stall):  # polls every second: a few alike suffice
            assert heard.wait(300), "no stall reported for a task that can never start"
    finally:
        ray.cancel(ref)
    assert "1 x {CPU: 3} (task/actor)" in said[0] and "2 of 2 CPU" in said[0]


def test_stall_fail_ends_the_driver_with_one_line_and_exit_1():
    code = "from pipeline.watchdog import fail_run\nfail_run('stage train: no progress for 600 s')\nprint(1)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["cropclean: stage train: no progress for 600 s"]


# ------------------------------------------------------------------------------- an existing Ray instance


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _session_pids(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [pid for pid, s in (line.split() for line in out.splitlines()) if int(s) == sid]


@pytest.fixture
def ray_started_by_hand():
    """`ray start --head --num-cpus 1`, as a user types it, in a private temp dir (TMPDIR): only a driver
    with the same TMPDIR finds it, so the machine's other Ray instances neither see it nor are seen. The
    node runs in a session of its own and is stopped by signalling that session (never `ray stop`)."""
    base = next(p for p in (random.randrange(41_000, 59_000, 10) for _ in range(200))
                if all(_free(p + k) for k in (0, 1, 2, 3, 4, 6, 7, 8)))  # fmt: skip
    tmp = tempfile.mkdtemp(prefix="ccr-", dir="/tmp")  # short: Ray keeps unix sockets under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(TMPDIR=tmp, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    ports = ["--port", str(base), "--ray-client-server-port", str(base + 1), "--node-manager-port",
             str(base + 2), "--object-manager-port", str(base + 3), "--dashboard-agent-listen-port",
             str(base + 4), "--dashboard-agent-grpc-port", str(base + 6), "--metrics-export-port",
             str(base + 7), "--runtime-env-agent-port", str(base + 8), "--min-worker-port",
             str(base + 100), "--max-worker-port", str(base + 399)]  # fmt: skip
    starter = subprocess.Popen(
        ["setsid", str(BIN / "ray"), "start", "--head", "--num-cpus", "1", "--num-gpus", "0",
         "--include-dashboard", "false", "--disable-usage-stats", "--object-store-memory", "100000000",
         *ports],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output, _ = starter.communicate(timeout=300)
        assert starter.returncode == 0, output
        yield env
    finally:
        for _ in range(2):
            pids = _session_pids(starter.pid)
            if pids:
                subprocess.run(["kill", "-KILL", *pids], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.timeout(900)
def test_a_local_instance_left_by_ray_start_is_joined_with_a_one_line_warning(ray_started_by_hand):
    """RAY_ADDRESS unset and ray.num_cpus set (the cpu-small preset sets 2): Ray itself would raise
    "When connecting to an existing cluster, num_cpus and num_gpus must not be provided"."""
    code = (
        "import ray\nfrom pipeline.config import RayConfig\nfrom pipeline.runner import ensure_ray\n"
        "ensure_ray(RayConfig(num_cpus=2))\nprint('CPU', ray.cluster_resources().get('CPU'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ray_started_by_hand,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU 1.0" in proc.stdout  # the running instance's 1 CPU, not the 2 asked for
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "already running" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "ray.num_cpus=2 ignored" in lines[0]
    assert "`ray stop`" in lines[0] and "ray.address=auto" in lines[0]
    assert RayConfig(num_cpus=2).stall_timeout == 600 and not RayConfig().stall_fail
