"""The driver's side of a fit: one Ray Train run per group, named after the group's key, so a
restarted driver or a failed worker resumes it from its last commit (`commits.py`); a group of
one worker that a Tune trial drives runs in that trial itself, its commits the trial's
checkpoints (a Ray Train run would add a controller and a worker process to every trial:
~15-30 s each on a small node, for nothing a single worker needs)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from pathlib import Path

import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raysae.checkpoint import train_state_counters
from raysae.config import JobConfig, to_dict
from raysae.distributed.engine.commits import GroupState, TrialCommits, read_group
from raysae.distributed.engine.fit import Fit
from raysae.distributed.engine.group import group_loop, train_group
from raysae.distributed.engine.layout import output_dir, run_name_for, train_runs_dir
from raysae.distributed.engine.specs import FitResult, FitSpec
from raysae.tracking import job_tracking_uri

WORKER_CPUS = 0.5
"""CPUs per Ray Train worker without a GPU: below one, so that on small nodes whole-CPU workers
do not starve Ray Data's read tasks and the other Ray tasks (RAY_NOTES: a hang, no error)."""
TRIAL_CPUS = 0.1
"""CPUs of a Tune trial that only drives a data-parallel group's Train run (its workers ask for
their own)."""

_IN_TRIAL: contextvars.ContextVar[bool] = contextvars.ContextVar("raysae_in_trial", default=False)


@contextlib.contextmanager
def in_trial() -> Iterator[None]:
    """Within it, `fit_on_ray` runs a one-worker group in the calling Tune trial."""
    token = _IN_TRIAL.set(True)
    try:
        yield
    finally:
        _IN_TRIAL.reset(token)


def runs_in_trial(job: JobConfig) -> bool:
    """Whether a trial runs its group itself (one worker) rather than on a Ray Train run."""
    return job.train.num_workers == 1


def trial_resources(job: JobConfig) -> dict[str, float]:
    """A Tune trial's resources: those of the one worker it runs itself, or (data-parallel)
    TRIAL_CPUS, its Train workers asking for their own (`worker_scaling`)."""
    if not runs_in_trial(job):
        return {"CPU": TRIAL_CPUS}
    return {"CPU": 1.0, "GPU": 1.0} if job.train.use_gpu else {"CPU": TRIAL_CPUS + WORKER_CPUS}


def worker_scaling(job: JobConfig) -> ScalingConfig:
    """`train.num_workers` workers, on a GPU each when `train.use_gpu`, else WORKER_CPUS each."""
    tc = job.train
    return ScalingConfig(
        num_workers=tc.num_workers,
        use_gpu=tc.use_gpu,
        resources_per_worker=None if tc.use_gpu else {"CPU": WORKER_CPUS},
    )


def fit_on_ray(job: JobConfig, spec: FitSpec, fit: type[Fit], *, max_failures: int = 2
               ) -> dict[str, FitResult]:
    """Run one Fit on Ray Train, or in the calling Tune trial (`in_trial`) when it has one
    worker; idempotent for a given spec.key (finished members are reused). Returns each
    member's result by key."""
    fit.check(job, spec)
    steps = {m.key: train_state_counters(m.resume_from)[0] for m in spec.members if m.resume_from}
    if steps and (len(set(steps.values())) > 1 or len(steps) < len(spec.members)):
        raise ValueError(f"group {spec.key}: members go on from steps {steps}; a group shares "
                         "one stream, so all its members must go on from one step")
    if _IN_TRIAL.get() and runs_in_trial(job):
        device = torch.device("cuda" if job.train.use_gpu else "cpu")
        group = group_loop(fit(job, spec, 0, 1, device), job_tracking_uri(job), TrialCommits())
    else:
        group = _train_run(job, spec, fit, max_failures)
    return {
        m.key: FitResult(output_dir(job, fit.output_kind, m.key), group.run_ids[m.key],
                         group.finished.get(m.key, {}), group.failed.get(m.key))
        for m in spec.members
    }


def _train_run(job: JobConfig, spec: FitSpec, fit: type[Fit], max_failures: int) -> GroupState:
    """The group on its own Ray Train run (named after its key); where its last commit left it."""
    trainer = TorchTrainer(
        train_group,
        train_loop_config={"job": to_dict(job), "spec": spec, "fit": fit,
                           "uri": job_tracking_uri(job)},
        scaling_config=worker_scaling(job),
        run_config=RunConfig(
            name=run_name_for(spec.key),
            storage_path=str(train_runs_dir(job)),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        return read_group(Path(d), states=False)
