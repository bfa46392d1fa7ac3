"""A group's commits: what a group checkpoint holds (the step, each unfinished member's training
state at that step, the finished members' final metrics, the failed members' errors, the MLflow
run ids), how rank 0 commits one, and how a worker that starts (fresh or after a failure)
resumes from the last one. Commits go to Ray Train (`TrainCommits`: a data-parallel group's
workers) or to the Tune trial that runs a one-worker group itself (`TrialCommits`)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import ray.train
from ray.train import Checkpoint, CheckpointConsistencyMode

from raysae.checkpoint import TrainState, load_train_state, save_train_state
from raysae.distributed.engine.layout import run_name_for
from raysae.distributed.engine.specs import RunSpec
from raysae.train import Trainer

GROUP_FILE = "group.json"
"""In a group checkpoint: the step, each finished member's final metrics, each failed member's
error, the MLflow run ids."""


@dataclass
class GroupState:
    """Where a group stands: batches consumed, each unfinished member's state at that step,
    the final metrics of the members already done and the errors of those that failed."""

    step: int = 0
    states: dict[str, TrainState] = field(default_factory=dict)
    finished: dict[str, dict[str, float]] = field(default_factory=dict)
    run_ids: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def read_group(folder: Path, states: bool = True) -> GroupState:
    """The group state a checkpoint folder holds (with its members' training states, or not)."""
    group = json.loads((folder / GROUP_FILE).read_text())
    kept = {k: load_train_state(folder / "states" / run_name_for(k)) for k in group["active"]
            } if states else {}
    return GroupState(group["step"], kept, group["finished"], group["run_ids"], group["failed"])


class Commits(Protocol):
    """Where a group's commits go and come back from."""

    def last(self) -> Any:
        """The last committed checkpoint (a folder behind `as_directory()`), or None."""

    def report(self, metrics: dict[str, Any], folder: str | None, name: str | None) -> None:
        """Report `metrics` and, from rank 0, commit the checkpoint in `folder` (as `name`);
        return once it is registered, so that a death after it does not lose it."""


class TrainCommits:
    """A Ray Train run's: every worker reports, rank 0 with the checkpoint, which the
    controller has registered before rank 0 goes on."""

    def last(self) -> Any:
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], folder: str | None, name: str | None) -> None:
        checkpoint = None if folder is None else Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        if checkpoint is not None:
            ray.train.get_all_reported_checkpoints(CheckpointConsistencyMode.COMMITTED)


class TrialCommits:
    """A Tune trial's own, for the one-worker group it runs itself (`launch.fit_on_ray`): Tune
    persists each checkpoint before `tune.report` returns, and a retried or restored trial
    gets the last one back."""

    def last(self) -> Any:
        from ray import tune  # here: a Train worker, which imports this module, never loads Tune

        return tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], folder: str | None, name: str | None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=None if folder is None else tune.Checkpoint.from_directory(folder))


def resume(members: Sequence[RunSpec], commits: Commits) -> GroupState:
    """The group state of the last committed checkpoint; for a fresh run, the states the
    members go on from (`resume_from`, all at one step), or nothing."""
    checkpoint = commits.last()
    if checkpoint is None:
        states = {m.key: load_train_state(m.resume_from) for m in members if m.resume_from}
        return GroupState(next(iter(states.values())).step if states else 0, states)
    with checkpoint.as_directory() as d:
        return read_group(Path(d))


def commit(group: GroupState, trainers: Mapping[str, Trainer], rank: int, commits: Commits
           ) -> None:
    """Every worker reports; rank 0 writes the group state (every unfinished member's state at
    this step), then waits until it is registered: a worker that dies before that would send
    the run back to the previous checkpoint, costing a whole interval."""
    if rank != 0:
        commits.report({"step": group.step}, None, None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for key, trainer in trainers.items():
            save_train_state(trainer.state(), Path(tmp) / "states" / run_name_for(key))
        record = {"step": group.step, "active": list(trainers), "finished": group.finished,
                  "run_ids": group.run_ids, "failed": group.failed}
        (Path(tmp) / GROUP_FILE).write_text(json.dumps(record))
        commits.report({"step": group.step, "finished": len(group.finished)}, tmp,
                       f"step_{group.step:012d}")
