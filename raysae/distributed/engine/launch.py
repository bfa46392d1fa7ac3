"""The driver's side of a fit: one Ray Train run per group, named after the group's key, so a
restarted driver or a failed worker resumes it from its last commit (`commits.py`)."""

from __future__ import annotations

from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raysae.checkpoint import train_state_counters
from raysae.config import JobConfig, to_dict
from raysae.distributed.engine.commits import read_group
from raysae.distributed.engine.fit import Fit
from raysae.distributed.engine.group import train_group
from raysae.distributed.engine.layout import output_dir, run_name_for, train_runs_dir
from raysae.distributed.engine.specs import FitResult, FitSpec
from raysae.tracking import job_tracking_uri

WORKER_CPUS = 0.5
"""CPUs per Ray Train worker without a GPU: below one, so that on small nodes whole-CPU workers
do not starve Ray Data's read tasks and the other Ray tasks (RAY_NOTES: a hang, no error)."""


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
    """Run one Fit on Ray Train; idempotent for a given spec.key (finished members are reused).
    Returns each member's result by key."""
    fit.check(job, spec)
    steps = {m.key: train_state_counters(m.resume_from)[0] for m in spec.members if m.resume_from}
    if steps and (len(set(steps.values())) > 1 or len(steps) < len(spec.members)):
        raise ValueError(f"group {spec.key}: members go on from steps {steps}; a group shares "
                         "one stream, so all its members must go on from one step")
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
        group = read_group(Path(d), states=False)
    return {
        m.key: FitResult(output_dir(job, fit.output_kind, m.key), group.run_ids[m.key],
                         group.finished.get(m.key, {}), group.failed.get(m.key))
        for m in spec.members
    }
