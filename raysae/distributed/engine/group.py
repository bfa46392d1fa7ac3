"""The group loop: what every worker of a Ray Train run (or the Tune trial that runs a one-worker
group itself) does, for every Fit.

    open the group (resume its last commit, build the unfinished members, open their runs)
    -> this worker's stream from the step it stopped at -> for each batch: `step` every live
    member; where a member's checkpoint or stop check falls, `evaluate_due` (rank 0, in one
    pass), `apply_stops` (rank 0 decides, every worker follows), `retire` the members that
    diverged, reached their budget or stopped, `commit` the group, `finish` their runs
    -> until no member is live.

A member that diverges fails alone (its run FAILED with `raysae.error`) and the group goes on.
Each step of the loop is one method of `Group`, and each member's state one `Member` record.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray.train
import ray.train.torch
import torch

from raysae.checkpoint import TrainState, save_train_state
from raysae.config import JobConfig, from_dict
from raysae.distributed.engine.collectives import allreduce_mean
from raysae.distributed.engine.commits import Commits, GroupState, TrainCommits, commit, resume
from raysae.distributed.engine.fit import Fit
from raysae.distributed.engine.layout import stop_state_dir
from raysae.distributed.engine.members import MemberRun, log_readout
from raysae.distributed.engine.specs import RunSpec
from raysae.distributed.engine.stops import StopPolicy
from raysae.tracking import Tracker
from raysae.train import Diverged, Trainer

log = logging.getLogger("raysae.engine")


def train_group(config: dict[str, Any]) -> None:
    """A Ray Train worker's loop (`fit_on_ray`'s train_loop_config: job, spec, fit, uri)."""
    ctx = ray.train.get_context()
    fit: Fit = config["fit"](from_dict(JobConfig, config["job"]), config["spec"],
                             ctx.get_world_rank(), ctx.get_world_size(),
                             ray.train.torch.get_device())
    group_loop(fit, config["uri"], TrainCommits())


def group_loop(fit: Fit, uri: str, commits: Commits) -> GroupState:
    """The loop, from the last commit in `commits` until no member is live; returns where the
    group ends (its last commit's content)."""
    group = Group(fit, uri, commits)
    clock = group.clock
    with contextlib.closing(fit.batches(group.state.step)) as batches:
        while group.live:
            with clock("stream"):
                batch = next(batches, None)
            if batch is None:
                raise group.live[0].trainer.out_of_data()
            with clock("train"):
                group.step(batch)
            if not group.eventful():
                continue
            with clock("eval"):
                group.apply_stops(group.evaluate_due())
            done = group.retire()
            if group.changed():  # a stop check alone commits nothing (it is replayed on resume)
                with clock("commit"):
                    group.commit()
            group.finish(done)
    return group.state


@dataclass(eq=False)
class Member:
    """One live member of the group on this worker, and what the current step did to it."""

    spec: RunSpec
    model: torch.nn.Module
    run: MemberRun | None = None
    """Its MLflow run (rank 0 only)."""
    trainer: Trainer = field(init=False)
    # what this step did (cleared before each step)
    checkpoint: TrainState | None = None
    """Its checkpoint fell on this step (the trainer's `on_checkpoint`)."""
    check: TrainState | None = None
    """Its stop rule is checked at this step, between its checkpoints."""
    error: str | None = None
    """It diverged at this step: why."""
    values: dict[str, float] | None = None
    """Rank 0: the metrics logged at this step's checkpoint or check."""
    stopped: str | None = None
    """Its stop rule holds at this step: why (rank 0's decision, on every worker)."""

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def at(self) -> TrainState | None:
        """Where it is evaluated at this step: its checkpoint, or its stop check."""
        return self.checkpoint if self.checkpoint is not None else self.check

    def checkpoint_due(self, state: TrainState) -> None:
        self.checkpoint = state

    def clear(self) -> None:
        self.checkpoint = self.check = self.error = self.values = self.stopped = None


class Group:
    """A group's members on this worker, from its last commit to its end, one step at a time."""

    def __init__(self, fit: Fit, uri: str, commits: Commits) -> None:
        self.fit, self.rank, self.world, self.commits = fit, fit.rank, fit.world, commits
        self.state: GroupState = resume(fit.spec.members, commits)
        self.stops = StopPolicy(fit.world)
        self.clock = Clock()
        settled = self.state.finished.keys() | self.state.failed.keys()
        self.live = [Member(m, fit.build(m, self.state.states.get(m.key)))
                     for m in fit.spec.members if m.key not in settled]
        self.stepped: list[Member] = []  # the members of the current step
        self.tracker = Tracker(uri, fit.job.name) if self.rank == 0 else None
        if self.tracker is not None:
            self._open_runs(self.tracker)
        for m in self.live:
            m.trainer = fit.trainer(
                m.spec, m.model, self.state.states.get(m.key),
                on_metrics=m.run.log_train if m.run is not None else None,
                on_checkpoint=m.checkpoint_due,
                allreduce_grads=allreduce_mean if self.world > 1 else None,
                world_size=self.world,
            )

    def _open_runs(self, tracker: Tracker) -> None:
        """Rank 0: open (or continue) every member's run; settle those done or failed before
        the last commit (their runs maybe not yet marked so)."""
        runs = {m.key: MemberRun(self.fit, m, tracker) for m in self.fit.spec.members}
        self.state.run_ids = {k: r.run_id for k, r in runs.items()}
        for key, run in runs.items():
            if key in self.state.finished:
                run.finish(int(self.state.finished[key]["tokens_seen"]))
            elif key in self.state.failed:
                run.fail(self.state.failed[key])
        for m in self.live:
            m.run = runs[m.key]

    def step(self, batch: Any) -> None:
        """Step every live member on its part of the batch. A member that diverges is marked
        (the same on every worker: the gradient is all-reduced); one that crosses a stop
        check between its checkpoints is marked for evaluation."""
        self.stepped = list(self.live)
        for m in self.stepped:
            m.clear()
            before = m.trainer.tokens
            try:
                m.trainer.step(self.fit.member_batch(m.spec, batch))
            except Diverged as e:
                m.error, m.checkpoint = f"{m.spec.name}: {e}", None
                continue
            if m.checkpoint is None and self.stops.check_due(m.spec, before, m.trainer.tokens):
                m.check = TrainState(m.trainer.step_no, m.trainer.tokens, {}, {}, {})
        self.state.step += 1

    def eventful(self) -> bool:
        """Whether this step needs more than the step: a checkpoint, a check or a divergence."""
        return any(m.at is not None or m.error is not None for m in self.stepped)

    def evaluate_due(self) -> list[Member]:
        """The members evaluated at this step (their checkpoint or stop check fell on it; the
        same on every worker). Rank 0 evaluates them in one pass, with the readouts of those
        at their budget, logs each and keeps its artefact (its final one at its budget)."""
        evaluated = ([m for m in self.stepped if m.check is not None]
                     + [m for m in self.stepped if m.checkpoint is not None])
        if self.tracker is None or not evaluated:
            return evaluated
        tracker = self.tracker
        reads = {r.key: (r, m.model, m.checkpoint) for m in evaluated
                 if m.checkpoint is not None and m.trainer.done
                 for r in m.spec.readouts if tracker.finished_metrics(r.key) is None}
        evals = self.fit.evaluate({**{m.key: (m.spec, m.model, m.at) for m in evaluated},
                                   **reads})
        for m in evaluated:
            assert m.run is not None and m.at is not None
            m.values = m.run.checkpoint(m.model, m.at, evals[m.key], final=m.trainer.done)
        for key, (readout, _, _) in reads.items():
            log_readout(self.fit, tracker, readout, evals[key])
        return evaluated

    def apply_stops(self, evaluated: list[Member]) -> None:
        """Mark the evaluated members whose stop rule holds here (`StopPolicy`)."""
        why = self.stops.decide(evaluated)
        for m in evaluated:
            m.stopped = why.get(m.key)

    def retire(self) -> list[Member]:
        """Members leave the group at this step. One that diverged fails alone (its run FAILED
        with why) and the others go on; one at its budget or stopped by its rule is done: rank
        0 keeps its final metrics and, for one stopped short of its budget, makes this
        checkpoint its final artefact and keeps its training state (a higher target trains it
        on from there). Returns the done ones (their runs finish after the commit)."""
        for m in self.stepped:
            if m.error is not None:
                log.error("%s", m.error)
                self.state.failed[m.key] = m.error
                if m.run is not None:
                    m.run.fail(m.error)
        done = [m for m in self.stepped
                if m.error is None and (m.trainer.done or m.stopped is not None)]
        for m in done:
            if m.run is None:
                continue
            if not m.trainer.done:
                m.run.save_final(m.model)
                save_train_state(m.trainer.state(),
                                 stop_state_dir(self.fit.job, m.key, m.trainer.tokens))
            if m.values is not None:
                self.state.finished[m.key] = m.values
        self.live = [m for m in self.live if m.error is None and m not in done]
        return done

    def changed(self) -> bool:
        """Whether this step changed what a commit holds: a checkpoint, a divergence, a stop."""
        return any(m.checkpoint is not None or m.error is not None or m.stopped is not None
                   for m in self.stepped)

    def commit(self) -> None:
        """A group checkpoint at this step: every live member's state (`commits.commit`)."""
        commit(self.state, {m.key: m.trainer for m in self.live}, self.rank, self.commits)

    def finish(self, done: list[Member]) -> None:
        """Rank 0: finish the runs of the members done at this step, with the group's clocks."""
        for m in done:
            if m.run is not None:
                m.run.finish(m.trainer.tokens, self.clock.seconds(), m.stopped)


class Clock:
    """Seconds spent in each part of the worker loop (stream: reading or forwarding the data;
    train: the steps; eval and commit: checkpoints), and in all since it started."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.parts: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.parts[part] = self.parts.get(part, 0.0) + time.perf_counter() - t

    def seconds(self) -> dict[str, float]:
        return {**self.parts, "worker": time.perf_counter() - self.start}
