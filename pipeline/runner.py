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
from pipeline.config import ConfigError, RayConfig, RunConfig
from pipeline.faults import FaultPlan
from pipeline.layout import RunLayout
from pipeline.resources import amounts
from pipeline.stages.base import RunContext, Stage, StageResult
from pipeline.summary import update_metrics
from pipeline.watchdog import Watchdog

log = logging.getLogger("cropclean")


_RAY_LOG_HANDLER = "cropclean-ray-log"


def ensure_ray(cfg: RayConfig, log_file: str | None = None) -> None:
    """Connect to the cluster named by the config or RAY_ADDRESS, else start a local instance.

    With neither, Ray itself connects to an instance that `ray start --head` left running on this
    machine, and refuses ``num_cpus``/``num_gpus`` then: the run connects without them and says, in one
    line, that they were ignored and what to do to have them.

    The console is cropclean's: Ray's own log lines go to ``log_file`` (when it is a local path), and
    its workers' output stays in Ray's session folder (``ray_session_logs()``) instead of being echoed,
    line by line, between the stage lines.
    """
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        ray.init(address=address, **quiet)
    else:
        try:
            ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False, **quiet)
        except ValueError as exc:
            if "connecting to an existing cluster" not in str(exc):
                raise
            ray.init(**quiet)
            log.warning(existing_instance_warning(cfg, ray.get_runtime_context().gcs_address,
                                                  ray.cluster_resources()))  # fmt: skip
    configure_ray_data()
    if log_file is not None:
        route_ray_logs(log_file)


def route_ray_logs(log_file: str) -> str | None:
    """Send the driver's Ray log lines (Ray Core, Data, Train) to ``log_file`` instead of the console;
    returns its local path, or None for a remote run folder (the lines stay on the console)."""
    if "://" in log_file and not log_file.startswith("file://"):
        return None
    path = log_file.removeprefix("file://")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.set_name(_RAY_LOG_HANDLER)
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):  # the console's, and an earlier run's file in this process
            console = isinstance(old, logging.StreamHandler) and not isinstance(old, logging.FileHandler)
            if console or old.get_name() == _RAY_LOG_HANDLER:
                logger.removeHandler(old)
                if not console:
                    old.close()
        logger.addHandler(handler)
        logger.propagate = False
    return path


def ray_session_logs() -> str | None:
    """Where Ray keeps this machine's process logs of the session (workers' output, tracebacks), or
    None when this process holds no Ray node (Ray keeps no public call for it)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_logs_dir_path() if ray.is_initialized() and node is not None else None


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


def _read_marker(uri: str) -> dict[str, Any] | None:
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_text(uri))
    except (ValueError, OSError):
        return None


def _from_marker(marker: dict[str, Any]) -> StageResult:
    """A finished stage's result as its completion marker recorded it."""
    return StageResult(stats=marker.get("stats", {}), fingerprint=marker.get("fingerprint", ""),
                       errors=list(marker.get("errors", [])), seconds=float(marker.get("seconds", 0.0)),
                       skipped=True)  # fmt: skip


class IncompleteInputs(ConfigError):
    """A stage was asked to run alone, but a stage before it is not complete under this config."""


def first_incomplete(cfg: RunConfig, stages: Sequence[Stage], before: str) -> str | None:
    """The first of ``stages`` ahead of stage ``before`` that is not complete under ``cfg`` (its marker's
    key, chained as ``run_stages`` chains it), or None when all of them are. Reads markers only."""
    layout, chain = RunLayout(cfg.out), ""
    for stage in stages:
        if stage.name == before:
            return None
        chain = f"{chain}|{stage.name}={stage.config_key(cfg)}"
        marker = _read_marker(layout.stage_marker(stage.name))
        if not (marker and marker.get("key") == storage_key(chain) and marker.get("final", True)):
            return stage.name
        chain += f"#{marker.get('fingerprint', '')}"
    return None


def run_stages(cfg: RunConfig, stages: Sequence[Stage], faults: FaultPlan | None = None,
               only: str | None = None) -> RunReport:  # fmt: skip
    """Run ``stages`` in order, skipping those whose completion marker matches the config.

    A stage's key chains the keys of the stages before it, so a change that affects one stage re-runs
    it and everything after it. Each stage's result goes to its marker (``OUT/stages/<name>/``) and
    its metrics sections to ``OUT/metrics.json``. With ``only``, that stage runs (complete or not) and
    the stages before it must be complete: IncompleteInputs names the first that is not.
    """
    ctx = RunContext(cfg=cfg, faults=faults or FaultPlan.from_env())
    layout = ctx.layout
    storage.write_text_atomic(layout.run_config, cfg.to_yaml())
    ensure_ray(cfg.ray, layout.ray_log)
    report = RunReport()
    chain = ""
    for stage in stages:
        chain = f"{chain}|{stage.name}={stage.config_key(cfg)}"
        key = storage_key(chain)
        ctx.keys[stage.name] = key
        marker_uri = layout.stage_marker(stage.name)
        marker = _read_marker(marker_uri)
        complete = bool(marker and marker.get("key") == key and marker.get("final", True))
        if only is not None and stage.name != only and not complete:
            raise IncompleteInputs(
                f"stage {only}: stage {stage.name} before it is not complete for this config in {cfg.out}; "
                f"run the pipeline (cropclean clean, or cropclean run CONFIG) first"
            )
        if marker and complete and stage.name != only:
            progress.stage_skipped(stage.name)
            result = _from_marker(marker)
            report.results[stage.name] = result
            chain += f"#{result.fingerprint}"
            continue
        progress.stage_running(stage.name)
        with Watchdog(stage.name, cfg.ray.stall_timeout, cfg.ray.stall_fail):
            result = stage.timed_run(ctx)
        progress.stage_done(stage.name, result.seconds)
        # What later stages depend on includes this stage's output, not only its config: a re-run that
        # retried failed downloads changes the output, and what follows must run again.
        chain += f"#{result.fingerprint}"
        for section, values in result.metrics.items():
            update_metrics(cfg.out, section, values)
        record = {
            "stage": stage.name,
            "key": key,
            "seconds": round(result.seconds, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stats": result.stats,
            "fingerprint": result.fingerprint,
            "errors": result.errors,
            # Not final: work is left for a later run (downloads to retry, a provider that stopped).
            "final": not result.incomplete,
        }
        storage.write_text_atomic(marker_uri, json.dumps(record, indent=2, default=str))
        report.results[stage.name] = result
    return report


def storage_key(chain: str) -> str:
    return hashlib.sha256(chain.encode()).hexdigest()[:16]
