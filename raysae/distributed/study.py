"""A study as data: its phases in order, each declared by name, kind, trials and what it needs,
on the one runner both sweeps share (`run_study`).

A study (the layer-transfer sweep, the stitching sweep) is a `Study`: its parent MLflow run
(key, name, tags), its costs, its phases and how its summary is read off what ran. `run_study`
opens (or finds again) the parent run, logs its costs, runs the phases in order and writes each
phase's status tag (`raysae.status.<phase>`), then the summary, and finishes the parent run.
A phase is one of five kinds:

- `cache`: the activations a study reads (`run(study)` -> what it made, kept by the phase's
  name); tagged `done`, or `streamed: nothing cached` when it made nothing.
- `train` and `fan_out`: trials run as Ray Train groups (a Tune experiment) or as Ray tasks
  (`run(study, todo)` -> (done, errors)); a trial whose dependency did not finish is skipped
  with that reason, the others run; tagged `<n> done, <m> not done`.
- `derive`: a step of the driver over what finished (`run(study)` -> what it made, kept by the
  phase's name), with no status tag of its own.
- `features`: the feature evaluations of the trained SAEs (`run(study, targets)` -> errors by
  target key), failures reported as `features:<key>`; tagged `<n> done, <m> failed`.

A phase's trials may be known only once the phases before it ran (the budget plan's, read off
the transfers' curves; the stitch sweep's, once its layers are matched): `trials` is then a
function of the `StudyRun`. A phase that `needs` other phases runs only where none of their
trials failed, and is left out (no tag) otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from raysae.config import JobConfig, flatten, to_dict
from raysae.costs import PhaseCost
from raysae.distributed.engine import Done, Errors, SweepResult, log_costs, run_groups
from raysae.distributed.redecide import going_on_groups, redecide_members
from raysae.distributed.training import (
    SAEGroupSpec,
    SAERun,
    members_of,
    regroup,
    run_sae_group,
    sae_groups,
)
from raysae.tracking import Tracker

log = logging.getLogger("raysae.study")

Kind = Literal["cache", "train", "fan_out", "derive", "features"]


@dataclass
class StudyRun:
    """A study while it runs: its job, its tracker and parent run, the trials each phase ran
    and what finished or failed so far, and what its cache and derive phases made."""

    job: JobConfig
    tracker: Tracker
    parent: str
    """The parent run's id."""
    finished: Done = field(default_factory=dict)
    failed: Errors = field(default_factory=dict)
    """As in the `SweepResult` the study returns (the features' failures as `features:<key>`)."""
    trials: dict[str, list[Any]] = field(default_factory=dict)
    """Phase name -> its trials (or feature targets), as it ran them."""
    done: dict[str, Done] = field(default_factory=dict)
    """Phase name -> the trials it finished."""
    made: dict[str, Any] = field(default_factory=dict)
    """Phase name -> what a cache or derive phase made."""

    def all_finished(self, phase: str) -> bool:
        """Whether none of the phase's trials failed (false for a phase that did not run)."""
        return phase in self.trials and not any(t.key in self.failed for t in self.trials[phase])

    def tag(self, tags: dict[str, str]) -> None:
        """Tags on the study's parent run."""
        self.tracker.set_tags(self.parent, tags)


@dataclass(frozen=True)
class Phase:
    """One step of a study (see the module docstring for what each kind runs and tags)."""

    name: str
    kind: Kind
    run: Callable[..., Any]
    trials: Sequence[Any] | Callable[[StudyRun], Sequence[Any]] = ()
    """Its trials (each with `.key` and `.depends_on`) or feature targets; or how to find them
    once the phases before it ran."""
    needs: tuple[str, ...] = ()
    """Phases none of whose trials may have failed for this one to run."""


@dataclass(frozen=True)
class Study:
    """A study's declaration: the job its phases run under; its parent run (a stable `key`
    with the study's digest in it, a `name`, `tags`, the job's params); its `costs` (the job with
    its source decided, why its activation source, the cost of every phase); its phases; and its
    `summary`, read off what ran and logged as `summary_file` on the parent run."""

    job: JobConfig
    key: str
    name: str
    tags: dict[str, str]
    costs: tuple[JobConfig, str, Sequence[PhaseCost]]
    phases: Sequence[Phase]
    summary: Callable[[StudyRun], dict[str, Any]]
    summary_file: str


def run_study(study: Study) -> SweepResult:
    """Run (or resume) every phase of the study; a failed trial fails the parent run."""
    job = study.job
    tracker = Tracker.for_job(job)
    parent = tracker.open_run(study.key, study.name, study.tags, flatten(job))
    log_costs(tracker, parent, *study.costs)
    run = StudyRun(job, tracker, parent)
    for phase in study.phases:
        if all(run.all_finished(p) for p in phase.needs):
            _RUNNERS[phase.kind](run, phase)
    summary = study.summary(run)
    tracker.log_dict(parent, summary, study.summary_file)
    tracker.finish(parent, "FINISHED" if not run.failed else "FAILED")
    return SweepResult(parent, run.finished, run.failed, summary)


def _trials_of(run: StudyRun, phase: Phase) -> list[Any]:
    trials = list(phase.trials(run) if callable(phase.trials) else phase.trials)
    run.trials[phase.name] = trials
    return trials


def _status(run: StudyRun, phase: Phase, status: str) -> None:
    run.tag({f"raysae.status.{phase.name}": status})
    log.info("phase %s: %s", phase.name, status)


def _cache(run: StudyRun, phase: Phase) -> None:
    run.made[phase.name] = made = phase.run(run)
    run.tag({f"raysae.status.{phase.name}": "done" if made else "streamed: nothing cached"})


def _derive(run: StudyRun, phase: Phase) -> None:
    run.made[phase.name] = phase.run(run)


def _trial_phase(run: StudyRun, phase: Phase) -> None:
    """The trials whose dependencies finished run; the others are skipped with the reason."""
    trials, todo = _trials_of(run, phase), []
    for t in trials:
        missing = [d for d in t.depends_on if d not in run.finished]
        if missing:
            run.failed[t.key] = f"skipped: depends on {missing[0]}, which did not finish"
        else:
            todo.append(t)
    done, errors = phase.run(run, todo) if todo else ({}, {})
    run.done[phase.name] = done
    run.finished.update(done)
    run.failed.update(errors)
    _status(run, phase, f"{len(done)} done, {len(trials) - len(done)} not done")


def _features(run: StudyRun, phase: Phase) -> None:
    targets = _trials_of(run, phase)
    errors = phase.run(run, targets)
    _status(run, phase, f"{len(targets) - len(errors)} done, {len(errors)} failed")
    run.failed.update({f"features:{k}": why for k, why in errors.items()})


_RUNNERS: dict[Kind, Callable[[StudyRun, Phase], None]] = {
    "cache": _cache, "train": _trial_phase, "fan_out": _trial_phase, "derive": _derive,
    "features": _features,
}


# ---------------------------------------------------------------------------------------------
# A train phase of SAE groups


def train_saes(run: StudyRun, phase: str, experiment: str, members: list[SAERun],
               shards: dict[str, str] | None, max_failures: int) -> tuple[Done, Errors]:
    """SAE trials as groups on one stream each (`training.sae_groups`), one Tune experiment;
    members with a finished run are settled first (those finished under another stop rule
    re-decided, `redecide.py`), and the groups keep their keys (an interrupted one resumes its
    Ray Train run)."""
    job = run.job
    source = job.train.source
    groups = {g.key: g for g in sae_groups(job, members, source, shards)}
    settled, going_on, refused = redecide_members(job, members, run.tracker)
    gone = settled.keys() | refused.keys() | {m.key for m in going_on}
    groups = {k: _without(g, gone) for k, g in groups.items()}
    groups |= {g.key: g for g in going_on_groups(job, going_on, source, shards)}
    log.info("phase %s: %d SAEs in %d group(s)", phase,
             sum(len(g.members) for g in groups.values()), sum(bool(g.members) for g in groups.values()))
    done, errors = run_groups(job, experiment, groups, run_sae_group,
                              {"job": to_dict(job), "max_failures": max_failures},
                              max_failures, members_of, regroup)
    return settled | done, errors | refused


def _without(group: SAEGroupSpec, gone: set[str]) -> SAEGroupSpec:
    return dataclasses.replace(group, members=tuple(m for m in group.members if m.key not in gone))
