"""The engine both sweeps run on: the Ray Train launch, the worker skeleton, Tune phases, the
phase runner and the Ray-task fan-out, each once.

A `Fit` is what one Ray Train run trains (an SAE, a stitch; the next step is a group of SAEs
on one activation stream), seen from one worker: how to build it, this worker's batches, the
pure-torch loop to run, how rank 0 evaluates it at a checkpoint. `fit_on_ray` launches it, and
`_worker` is the same skeleton for every Fit:

    resume the last committed state -> build -> this worker's batches from where it stopped ->
    open (or continue) the MLflow run on rank 0 -> train, committing each checkpoint ->
    log the final artefact and finish the run.

A Ray Train run is named after its Fit's stable key, so a worker that dies (or a driver that is
restarted) resumes from the last committed checkpoint and the MLflow run found by that key
continues; token budgets are met exactly either way.

A sweep is a list of `Phase`s over trials that name the trials they depend on (`run_phases`
skips the dependents of a failed trial); a phase runs its trials either as one Tune experiment
(`tune_phase`: each trial drives one Fit) or as plain Ray tasks (`fan_out`), and reports
(done, errors) by trial key.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar

import ray
import ray.train
import torch
import torch.distributed as dist
from ray import tune
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    CheckpointConsistencyMode,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from raysae.checkpoint import (
    TrainState,
    load_train_state,
    save_train_state,
    write_folder_atomically,
)
from raysae.config import JobConfig, digest, from_dict, to_dict
from raysae.distributed import root_cause
from raysae.tracking import Tracker, tracking_uri

log = logging.getLogger("raysae.engine")

WORKER_CPUS = 0.5
"""CPUs per Ray Train worker without a GPU: below one, so that on small nodes whole-CPU workers
do not starve Ray Data's read tasks and the other Ray tasks (RAY_NOTES: a hang, no error)."""
TRIAL_CPUS = 0.1
"""CPUs of a Tune trial, which only drives its Train run (its workers ask for their own)."""
RANK_SEED_STRIDE = 7919
"""Worker r shuffles its data with seed + r·stride (a prime: no two ranks share a seed)."""
SQLITE_CONCURRENT_TRIALS = 2
"""Trials at once against a sqlite MLflow store, which serialises its writers."""

Done = dict[str, dict[str, float]]
"""Trial key -> its final metrics."""
Errors = dict[str, str]
"""Trial key -> why it did not finish."""


def worker_seed(seed: int, rank: int) -> int:
    """The data-order seed of worker `rank`."""
    return seed + RANK_SEED_STRIDE * rank


def run_name_for(key: str) -> str:
    """A Ray Train run name derived only from the key: restarts find the same run directory."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return f"{safe[:80]}-{digest(key)}"


def train_runs_dir(job: JobConfig) -> Path:
    """Where Ray Train keeps every run's checkpoints (`<run name>/tokens_<n>/`)."""
    return Path(job.runs_dir).resolve() / "ray_train"


def output_dir(job: JobConfig, kind: str, key: str) -> Path:
    """Where the final artefact of the fit with this key is saved: `<runs_dir>/<kind>/<run>`."""
    return Path(job.runs_dir).resolve() / kind / run_name_for(key)


def checkpoint_folders(job: JobConfig, key: str, artifact: str) -> list[tuple[int, Path]]:
    """(tokens seen, artefact folder) of every checkpoint the fit with this key committed, in
    order: Ray Train keeps each one (num_to_keep=None) as `<run name>/tokens_<n>/<artifact>`."""
    run_dir = train_runs_dir(job) / run_name_for(key)
    found = {int(d.parent.name.removeprefix("tokens_")): d for d in run_dir.glob(f"tokens_*/{artifact}")}
    return sorted(found.items())


# ---------------------------------------------------------------------------------------------
# What a Ray Train run trains


@dataclass(frozen=True, kw_only=True)
class FitSpec:
    """The identity and MLflow placement of one fit; each Fit's spec adds what it reads."""

    key: str
    """Stable identity: the MLflow run key and the Ray Train run name."""
    name: str
    """Readable run name (MLflow UI)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra MLflow tags (grid axes)."""
    parent_run: str | None = None
    """MLflow parent run id (a sweep)."""


@dataclass(frozen=True)
class FitResult:
    out_dir: Path
    """The final artefact's folder."""
    run_id: str
    """MLflow run id."""
    metrics: dict[str, float]
    """Metrics of the final checkpoint."""


class Fit(ABC):
    """What one Ray Train run trains, built on every worker from the job and the spec."""

    artifact: ClassVar[str]
    """The artefact's folder name in a checkpoint and its MLflow artifact path."""
    output_kind: ClassVar[str]
    """The folder under runs_dir that holds the final artefacts of this kind."""

    def __init__(self, job: JobConfig, spec: FitSpec, rank: int, world: int, device: torch.device):
        self.job, self.spec, self.rank, self.world, self.device = job, spec, rank, world, device

    @classmethod
    @abstractmethod
    def check(cls, job: JobConfig, spec: FitSpec) -> None:
        """On the driver, before any worker starts: raise on settings the data cannot honour."""

    @abstractmethod
    def build(self, state: TrainState | None) -> torch.nn.Module:
        """The model on this worker's device, identical on every worker (a resumed run loads
        `state` inside the loop)."""

    @abstractmethod
    def batches(self) -> Iterator[Any]:
        """This worker's batches from the start of the run (the skeleton skips those consumed)."""

    @property
    @abstractmethod
    def files(self) -> list[str]:
        """The data files this worker reads (disjoint across workers)."""

    @abstractmethod
    def run_tags(self) -> dict[str, str]:
        """MLflow tags of the run (beside the spec's)."""

    @abstractmethod
    def run_params(self) -> dict[str, str]:
        """MLflow params of the run."""

    @abstractmethod
    def train(self, model: torch.nn.Module, batches: Iterator[Any], state: TrainState | None,
              **loop: Any) -> TrainState:
        """Run the pure-torch loop; `loop` carries on_metrics, on_checkpoint, allreduce_grads
        and world_size."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, state: TrainState) -> dict[str, float]:
        """Rank 0 at a checkpoint: the metrics logged at step = tokens seen."""

    @abstractmethod
    def save(self, model: torch.nn.Module, folder: Path) -> Path:
        """Write the artefact (an SAELens folder, a stitch folder)."""


class WorkerHooks:
    """Plug-in points of the worker skeleton for tests (chaos, tracing); production has none."""

    def batches(self, batches: Iterator[Any], fit: Fit, model: torch.nn.Module,
                start_step: int) -> Iterator[Any]:
        return batches

    def finished(self, fit: Fit, model: torch.nn.Module, start_step: int) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Launch (driver)


def worker_scaling(job: JobConfig) -> ScalingConfig:
    """`train.num_workers` workers, on a GPU each when `train.use_gpu`, else WORKER_CPUS each."""
    tc = job.train
    return ScalingConfig(
        num_workers=tc.num_workers,
        use_gpu=tc.use_gpu,
        resources_per_worker=None if tc.use_gpu else {"CPU": WORKER_CPUS},
    )


def fit_on_ray(
    job: JobConfig,
    spec: FitSpec,
    fit: type[Fit],
    *,
    max_failures: int = 2,
    hooks: WorkerHooks | None = None,
) -> FitResult:
    """Run one Fit on Ray Train; idempotent for a given spec.key (a finished run is reused)."""
    fit.check(job, spec)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job": to_dict(job), "spec": spec, "fit": fit, "hooks": hooks,
                           "uri": tracking_uri(job.runs_dir)},
        scaling_config=worker_scaling(job),
        run_config=RunConfig(
            name=run_name_for(spec.key),
            storage_path=str(train_runs_dir(job)),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    result = trainer.fit()
    out = output_dir(job, fit.output_kind, spec.key)
    with result.checkpoint.as_directory() as d:
        final = json.loads((Path(d) / "metrics.json").read_text())
        source = Path(d) / fit.artifact
        write_folder_atomically(out, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))
    return FitResult(out, final["run_id"], final["metrics"])


# ---------------------------------------------------------------------------------------------
# The worker skeleton


def allreduce_mean(params: list[torch.Tensor]) -> None:
    """Average gradients across workers with a single all-reduce of one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _resume_state() -> TrainState | None:
    """The state of the last committed checkpoint, if this run has one."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return load_train_state(Path(d) / "state")


class _RankZeroRun:
    """Rank 0's MLflow run: opened (or continued) by key, metrics at tokens seen."""

    def __init__(self, fit: Fit, uri: str):
        self.tracker = Tracker(uri, fit.job.name)
        spec = fit.spec
        tags = {**fit.run_tags(), **spec.tags}
        self.run_id = self.tracker.open_run(spec.key, spec.name, tags, fit.run_params(), spec.parent_run)

    def log_train(self, tokens: int, values: dict[str, float]) -> None:
        self.tracker.log_metrics(self.run_id, {f"train/{k}": v for k, v in values.items()}, tokens)

    def finish(self, fit: Fit, model: torch.nn.Module, state: TrainState) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            self.tracker.log_artifacts(self.run_id, fit.save(model, Path(tmp) / fit.artifact), fit.artifact)
        self.tracker.set_tags(self.run_id, {"raysae.tokens_seen": str(state.tokens_seen)})
        self.tracker.finish(self.run_id)


def _commit_checkpoint(fit: Fit, model: torch.nn.Module, run: _RankZeroRun | None,
                       state: TrainState) -> None:
    """Every worker reports; rank 0 evaluates, logs, and writes state + artefact + metrics,
    then waits until the controller has registered it: a worker that dies before that would
    send the run back to the previous checkpoint, costing a whole interval."""
    if run is None:
        ray.train.report({"tokens_seen": state.tokens_seen}, checkpoint=None)
        return
    values = {"tokens_seen": state.tokens_seen, **fit.evaluate(model, state)}
    run.tracker.log_metrics(run.run_id, values, step=state.tokens_seen)
    with tempfile.TemporaryDirectory() as tmp:
        save_train_state(state, Path(tmp) / "state")
        fit.save(model, Path(tmp) / fit.artifact)
        (Path(tmp) / "metrics.json").write_text(json.dumps({"run_id": run.run_id, "metrics": values}))
        ray.train.report(values, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"tokens_{state.tokens_seen:012d}")
    ray.train.get_all_reported_checkpoints(CheckpointConsistencyMode.COMMITTED)


def _worker(config: dict[str, Any]) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    job = from_dict(JobConfig, config["job"])
    fit: Fit = config["fit"](job, config["spec"], rank, world, ray.train.torch.get_device())
    hooks: WorkerHooks = config["hooks"] or WorkerHooks()

    state = _resume_state()
    start_step = state.step if state is not None else 0
    model = fit.build(state)
    batches = hooks.batches(islice(fit.batches(), start_step, None), fit, model, start_step)
    run = _RankZeroRun(fit, config["uri"]) if rank == 0 else None

    final = fit.train(
        model, batches, state,
        on_metrics=run.log_train if run is not None else None,
        on_checkpoint=lambda st: _commit_checkpoint(fit, model, run, st),
        allreduce_grads=allreduce_mean if world > 1 else None,
        world_size=world,
    )
    hooks.finished(fit, model, start_step)
    if run is not None:
        run.finish(fit, model, final)


# ---------------------------------------------------------------------------------------------
# Phases


@dataclass(frozen=True)
class Phase:
    """One step of a sweep: its trials (each with `.key` and `.depends_on`) and how to run the
    ones whose dependencies finished: `run(todo) -> (done, errors)`."""

    name: str
    trials: Sequence[Any]
    run: Callable[[list[Any]], tuple[Done, Errors]]


def run_phases(phases: Sequence[Phase], tracker: Tracker, parent: str) -> tuple[Done, Errors]:
    """Run the phases in order; a trial whose dependency did not finish is skipped with that
    reason, the others run. Each phase's tally is a `raysae.status.<phase>` tag on the parent."""
    finished: Done = {}
    failed: Errors = {}
    for phase in phases:
        todo = []
        for t in phase.trials:
            missing = [d for d in t.depends_on if d not in finished]
            if missing:
                failed[t.key] = f"skipped: depends on {missing[0]}, which did not finish"
            else:
                todo.append(t)
        done, errors = phase.run(todo) if todo else ({}, {})
        finished.update(done)
        failed.update(errors)
        status = f"{len(done)} done, {len(phase.trials) - len(done)} not done"
        tracker.set_tags(parent, {f"raysae.status.{phase.name}": status})
        log.info("phase %s: %s", phase.name, status)
    return finished, failed


@dataclass(frozen=True)
class SweepResult:
    parent_run: str
    """MLflow run id of the sweep."""
    finished: Done
    """Trial key -> final metrics, for every trial that completed."""
    failed: Errors
    """Trial key -> why it did not complete (its error, or the failed trial it needed)."""
    summary: dict[str, Any]
    """The sweep's summary (counts, and what each study adds)."""


def _tune_trial(config: dict[str, Any], run_trial: Callable[..., FitResult], payload: dict) -> None:
    """A Tune function trainable: one trial drives one Fit and reports its final metrics."""
    result = run_trial(config["key"], **payload)
    tune.report({**result.metrics, "out_dir": str(result.out_dir)})


def tune_phase(
    job: JobConfig,
    experiment: str,
    keys: list[str],
    run_trial: Callable[..., FitResult],
    payload: dict[str, Any],
    max_failures: int,
) -> tuple[Done, Errors]:
    """One Tune experiment over trial keys (a grid search on "key"), restored when it already
    exists; `run_trial(key, **payload)` fits the trial. Returns the metrics with a '/' in their
    name (eval/..., ce/...) and `flops` per finished key, and the root cause per failed key."""
    storage = Path(job.runs_dir).resolve() / "tune"
    trainable = tune.with_resources(
        tune.with_parameters(_tune_trial, run_trial=run_trial, payload=payload), {"CPU": TRIAL_CPUS}
    )
    path = storage / experiment
    if tune.Tuner.can_restore(path):
        log.info("restoring Tune experiment %s", path)
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"key": tune.grid_search(keys)},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent_fits(job)),
            run_config=tune.RunConfig(
                name=experiment,
                storage_path=str(storage),
                failure_config=tune.FailureConfig(max_failures=max_failures),
                verbose=1,
            ),
        )
    done: Done = {}
    errors: Errors = {}
    for result in tuner.fit():
        key = result.config["key"]
        if result.error is not None:
            errors[key] = f"failed: {root_cause(result.error)}"
        elif result.metrics and "out_dir" in result.metrics:
            done[key] = {
                k: v for k, v in result.metrics.items()
                if ("/" in k or k == "flops") and isinstance(v, int | float)
            }
        else:
            errors[key] = "failed: the trial reported no result"
    return done, errors


def concurrent_fits(job: JobConfig) -> int:
    """Fits at once: as many Train worker groups as the cluster's CPUs (or GPUs) hold, each
    with its driving trial; at most SQLITE_CONCURRENT_TRIALS against a sqlite MLflow store."""
    res = ray.cluster_resources()
    workers = job.train.num_workers
    if job.train.use_gpu:
        n = int(res.get("GPU", 0) // workers)
    else:
        n = int(res.get("CPU", 1) // (WORKER_CPUS * workers + TRIAL_CPUS))
    if tracking_uri(job.runs_dir).startswith("sqlite:"):
        n = min(n, SQLITE_CONCURRENT_TRIALS)
    return max(1, n)


def fan_out(
    task: Any,
    groups: dict[str, list[str]],
    *args: Any,
    max_retries: int,
    error_prefix: str = "failed",
    **options: Any,
) -> tuple[Done, Errors]:
    """One Ray task per group of trial keys, run concurrently: `task.remote(keys, *args)`
    returns {key: metrics}. A group's failure marks each of its keys with the root cause and
    does not stop the other groups."""
    refs = {label: task.options(max_retries=max_retries, **options).remote(keys, *args)
            for label, keys in groups.items()}
    done: Done = {}
    errors: Errors = {}
    for label, ref in refs.items():
        try:
            done.update(ray.get(ref))
        except Exception as e:
            for key in groups[label]:
                errors[key] = f"{error_prefix}: {root_cause(e)}"
    return done, errors
