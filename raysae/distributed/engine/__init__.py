"""The engine both sweeps run on, each concept once:

- `specs`: what a Ray Train run trains (a group `FitSpec` of members `RunSpec`) and gives back;
- `fit`: the `Fit` a study implements (build, stream, evaluate, save) and its stream check;
- `layout`: the runs-dir folders, all derived from stable keys;
- `tags`: the MLflow tag names a re-submitted sweep reads back;
- `group`: the group loop every worker runs (step, evaluate, stop, retire, commit, finish),
  with `members` (a member's MLflow run), `stops` (the stop policy), `commits` (the group
  checkpoint) and `collectives` (how workers agree);
- `launch`: one Ray Train run per group (`fit_on_ray`), or a one-worker group in its Tune trial;
- `phases`: a sweep as phases of trials (Tune experiments of groups, their retry);
- `faults`: a failure's kind (a member's own, out of memory, storage, tracking, network, config)
  and what the phase does about it;
- `fanout`: a phase as plain Ray tasks.

A Ray Train run is named after its group's stable key and a Tune trial after its group's, so a
worker that dies (or a driver that is restarted) resumes from the last committed checkpoint: every unfinished member from its own
state at that step, finished members not at all, and their MLflow runs found by key continue;
token budgets are met exactly either way. Each member's checkpoints are also kept as artefact
folders of their own (`<runs_dir>/checkpoints/<run>/tokens_<n>/`), for the evaluations that
follow a training.

The names the studies use are re-exported here, each loaded on first use: a Train worker, which
runs only the group loop, then does not import Ray Tune (its share of the 1.3 s of CPU this and
the lazy mlflow of `raysae.tracking` save in every worker process).
"""

import importlib
from typing import Any

_HOME = {
    "fanout": ("fan_out",),
    "fit": ("Fit", "worker_seed"),
    "launch": ("WORKER_CPUS", "fit_on_ray", "worker_scaling"),
    "layout": ("checkpoint_folders", "checkpoints_dir", "output_dir", "run_name_for",
               "stop_state_dir", "train_runs_dir"),
    "phases": ("MEMBER_FAILED", "Done", "Errors", "SweepResult", "concurrent_fits",
               "final_metrics", "log_costs", "run_groups", "tune_phase"),
    "specs": ("FitResult", "FitSpec", "RunSpec"),
    "tags": ("ERROR_TAG", "NODES_TAG", "STOP_RULE_TAG", "STOP_TAG"),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
