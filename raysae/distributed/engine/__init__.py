"""The engine both sweeps run on, each concept once:

- `specs`: what a Ray Train run trains (a group `FitSpec` of members `RunSpec`) and gives back;
- `fit`: the `Fit` a study implements (build, stream, evaluate, save) and its stream check;
- `layout`: the runs-dir folders, all derived from stable keys;
- `tags`: the MLflow tag names a re-submitted sweep reads back;
- `group`: the group loop every worker runs (step, evaluate, stop, retire, commit, finish),
  with `members` (a member's MLflow run), `stops` (the stop policy), `commits` (the group
  checkpoint) and `collectives` (how workers agree);
- `launch`: one Ray Train run per group (`fit_on_ray`);
- `phases`: a sweep as phases of trials (Tune experiments of groups, their retry);
- `fanout`: a phase as plain Ray tasks.

A Ray Train run is named after its group's stable key, so a worker that dies (or a driver that
is restarted) resumes from the last committed checkpoint: every unfinished member from its own
state at that step, finished members not at all, and their MLflow runs found by key continue;
token budgets are met exactly either way. Each member's checkpoints are also kept as artefact
folders of their own (`<runs_dir>/checkpoints/<run>/tokens_<n>/`), for the evaluations that
follow a training.

The names the studies use are re-exported here.
"""

from raysae.distributed.engine.fanout import fan_out
from raysae.distributed.engine.fit import Fit, StreamSupply, check_stream, worker_seed
from raysae.distributed.engine.launch import WORKER_CPUS, fit_on_ray, worker_scaling
from raysae.distributed.engine.layout import (
    checkpoint_folders,
    checkpoints_dir,
    output_dir,
    run_name_for,
    stop_state_dir,
    train_runs_dir,
)
from raysae.distributed.engine.phases import (
    MEMBER_FAILED,
    Done,
    Errors,
    SweepResult,
    concurrent_fits,
    final_metrics,
    log_costs,
    run_groups,
    tune_phase,
)
from raysae.distributed.engine.specs import FitResult, FitSpec, RunSpec
from raysae.distributed.engine.tags import ERROR_TAG, NODES_TAG, STOP_RULE_TAG, STOP_TAG

__all__ = [
    "ERROR_TAG", "MEMBER_FAILED", "NODES_TAG", "STOP_RULE_TAG", "STOP_TAG", "WORKER_CPUS",
    "Done", "Errors", "Fit", "FitResult", "FitSpec", "RunSpec", "StreamSupply",
    "SweepResult", "check_stream", "checkpoint_folders", "checkpoints_dir", "concurrent_fits",
    "fan_out", "final_metrics", "fit_on_ray", "log_costs", "output_dir", "run_groups",
    "run_name_for", "stop_state_dir", "train_runs_dir", "tune_phase",
    "worker_scaling", "worker_seed",
]
