"""Turns a list of stages into a run: completion markers, resume, Ray set-up, the resolved config."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline import progress, storage
from pipeline.config import RayConfig, RunConfig
from pipeline.faults import FaultPlan
from pipeline.resources import amounts
from pipeline.stages.base import RunContext, Stage, StageResult
from pipeline.watchdog import Watchdog

log = logging.getLogger("cropclean")


def ensure_ray(cfg: RayConfig) -> None:
    """Connect to the cluster named by the config or RAY_ADDRESS, else start a local instance.

    With neither, Ray itself connects to an instance that `ray start --head` left running on this
    machine, and refuses ``num_cpus``/``num_gpus`` then: the run connects without them and says, in one
    line, that they were ignored and what to do to have them.
    """
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        try:
            ray.init(
                num_cpus=cfg.num_cpus,
                num_gpus=cfg.num_gpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
        except ValueError as exc:
            if "connecting to an existing cluster" not in str(exc):
                raise
            ray.init(logging_level=logging.WARNING)
            log.warning(existing_instance_warning(cfg, ray.get_runtime_context().gcs_address,
                                                  ray.cluster_resources()))  # fmt: skip
    configure_ray_data()


def existing_instance_warning(cfg: RayConfig, address: str, resources: dict[str, float]) -> str:
    """One line: a local Ray instance was already running, the settings it ignores, what to do."""
    settings = {"ray.num_cpus": cfg.num_cpus, "ray.num_gpus": cfg.num_gpus}
    ignored = " and ".join(f"{k}={v}" for k, v in settings.items() if v is not None)
    has = amounts(resources.get("CPU", 0), resources.get("GPU", 0))
    return (
        f"ray: a Ray instance was already running on this machine (at {address}, from `ray start`); "
        f"connected to it ({has}), and {ignored} ignored. Run `ray stop` first to start a fresh instance "
        f"with these settings, or pass --set ray.address=auto to connect on purpose."
    )


def configure_ray_data() -> None:
    """Ray Data settings for every cropclean driver.

    Sort-based shuffles run as plain tasks: a groupby never waits for hash-shuffle aggregator actors to
    get CPUs, which stalls on one-CPU or busy clusters. Bars on a terminal; otherwise only warnings, so
    the logs of batch jobs stay readable.
    """
    import ray
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    if not os.isatty(2):  # Ray Data logs its progress at INFO level where there is no terminal
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # Bars redrawn into a log file are megabytes of noise (the context travels with each dataset,
        # so Ray Train's workers draw none either).
        ctx.enable_progress_bars = False


@dataclass
class RunReport:
    results: dict[str, StageResult] = field(default_factory=dict)

    @property
    def ran(self) -> list[str]:
        return [n for n, r in self.results.items() if not r.skipped]

    @property
    def skipped(self) -> list[str]:
        return [n for n, r in self.results.items() if r.skipped]


def _marker_uri(ctx: RunContext, stage: Stage) -> str:
    return storage.join(ctx.stage_dir(stage.name), "_COMPLETE.json")


def _read_marker(uri: str) -> dict[str, Any] | None:
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_text(uri))
    except (ValueError, OSError):
        return None


def run_stages(cfg: RunConfig, stages: Sequence[Stage], faults: FaultPlan | None = None) -> RunReport:
    """Run ``stages`` in order, skipping those whose completion marker matches the config.

    A stage's key chains the keys of the stages before it, so a change that affects one stage re-runs
    it and everything after it.
    """
    ctx = RunContext(cfg=cfg, faults=faults or FaultPlan.from_env())
    storage.write_text_atomic(ctx.uri("run.yaml"), cfg.to_yaml())
    ensure_ray(cfg.ray)
    report = RunReport()
    chain = ""
    for stage in stages:
        chain = f"{chain}|{stage.name}={stage.config_key(cfg)}"
        key = storage_key(chain)
        ctx.keys[stage.name] = key
        marker_uri = _marker_uri(ctx, stage)
        marker = _read_marker(marker_uri)
        if marker and marker.get("key") == key and marker.get("final", True):
            progress.stage_skipped(stage.name)
            stats = marker.get("stats", {})
            report.results[stage.name] = StageResult(stats=stats, skipped=True)
            chain += f"#{stats.get('fingerprint', '')}"
            continue
        progress.stage_running(stage.name)
        with Watchdog(stage.name, cfg.ray.stall_timeout, cfg.ray.stall_fail):
            result = stage.timed_run(ctx)
        progress.stage_done(stage.name, result.seconds)
        # What later stages depend on includes this stage's output, not only its config: a re-run that
        # retried failed downloads changes the output, and what follows must run again.
        chain += f"#{result.stats.get('fingerprint', '')}"
        record = {
            "stage": stage.name,
            "key": key,
            "seconds": round(result.seconds, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stats": result.stats,
            # Not final: work is left for a later run (downloads to retry, a provider that stopped).
            "final": not result.stats.get("incomplete", False),
        }
        storage.write_text_atomic(marker_uri, json.dumps(record, indent=2, default=str))
        report.results[stage.name] = result
    return report


def storage_key(chain: str) -> str:
    return hashlib.sha256(chain.encode()).hexdigest()[:16]
