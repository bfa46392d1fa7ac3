"""A sweep re-submitted with another stop rule: re-decide only what the new rule changes.

A transfer SAE's run records the rule it was stopped by (`engine.STOP_RULE_TAG`). When the
sweep now gives it another rule (a changed `sweep.stop_at`, or none), `stopping.redecide` reads
the new stopping point off what was already trained, as a fresh sweep would have found it
(training is deterministic: the same stream from the same state, checked at the same points):

- it stops at a check already trained (a lower target, or a higher one that a longer training
  of the same SAE already reached): that check's SAE becomes the final one, and the run is
  replaced by a copy of its history up to there. Nothing is trained.
- it ran its whole budget without reaching the new rule either: only its tags change.
- it stopped short of the new rule: it goes on from the state kept at its stop
  (`engine.stop_state_dir`), its group's stream starting at that step, in its own MLflow run.

What was trained is never lost: a replaced run is deleted in MLflow (restorable, tagged with
its replacement) and every checkpoint folder stays; the longest training of a key (its
"trajectory", deleted runs included) is what each re-decision reads, so lowering and raising a
target again trains nothing twice. A run whose rule did not change is left as it is.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from raysae.checkpoint import train_state_counters, write_folder_atomically
from raysae.config import JobConfig
from raysae.distributed.engine import (
    STOP_RULE_TAG,
    STOP_TAG,
    Done,
    Errors,
    checkpoints_dir,
    final_metrics,
    output_dir,
    stop_state_dir,
)
from raysae.distributed.features import CONFIG_TAG, DONE_TAG
from raysae.distributed.training import (
    SAES,
    SAEGroupFit,
    SAEGroupSpec,
    SAERun,
    member_config,
    sae_groups,
)
from raysae.stopping import NO_RULE, redecide, signature
from raysae.tracking import RunRecord, Tracker

log = logging.getLogger("raysae.sweep")

GOING_ON_TAG = "raysae.going_on_from"
"""On a run that trains on after a re-decision: the tokens it goes on from (its run RUNNING
until then, so that an interrupted re-submission finds it again)."""
REDECIDED_TAG = "raysae.redecided"
"""On a run whose stopping point a re-submitted sweep moved: from where to where, and why."""


def _trained(run: RunRecord) -> int:
    return int(run.tags.get("raysae.tokens_seen", -1))


def redecide_members(job: JobConfig, members: list[SAERun], tracker: Tracker
                     ) -> tuple[Done, list[SAERun], Errors]:
    """Each member with a finished run, against the rule it now has: (the members settled, by
    key with their final metrics; the members that train on, with `resume_from` set; the
    members that cannot be re-decided, with why). Members without a finished run are not
    returned: their groups train them as usual."""
    settled: Done = {}
    going_on: list[SAERun] = []
    errors: Errors = {}
    for m in members:
        live = tracker.find(m.key)
        if live is None:
            continue
        run = tracker.run(live)
        tags, status = run.tags, run.status
        if status == "RUNNING" and GOING_ON_TAG in tags:  # a re-decision interrupted: again
            state = stop_state_dir(job, m.key, int(tags[GOING_ON_TAG]))
            going_on.append(dataclasses.replace(m, resume_from=str(state)))
            continue
        if status != "FINISHED":
            continue
        if tags.get(STOP_RULE_TAG, NO_RULE) == signature(m.stop):
            settled[m.key] = final_metrics(run.metrics)
            continue
        try:
            outcome = _redecide(job, m, tracker, run)
        except _CannotRedecide as e:
            log.error("%s: %s", m.name, e)
            errors[m.key] = f"failed: {e}"
            continue
        if outcome is None:
            settled[m.key] = final_metrics(tracker.run(tracker.find(m.key)).metrics)
        else:
            going_on.append(outcome)
    if settled or going_on:
        log.info("re-decided stops: %d settled without training, %d train on",
                 len(settled), len(going_on))
    return settled, going_on, errors


class _CannotRedecide(RuntimeError):
    pass


def _redecide(job: JobConfig, m: SAERun, tracker: Tracker, live: RunRecord) -> SAERun | None:
    """Move the member's stopping point to where its new rule puts it; the member, set to
    train on, when that lies beyond what was trained (else None)."""
    budget = member_config(job, m)[1].num_tokens
    runs = [r for r in tracker.every_run(m.key) if r.status == "FINISHED" and _trained(r) >= 0]
    # the trajectory: the longest training of this SAE (the live run on ties)
    path = max(runs, key=lambda r: (_trained(r), r.run_id == live.run_id))
    trained, was = _trained(path), _trained(live)
    history = sorted(dict(tracker.history(path.run_id, m.stop.metric)).items()) if m.stop else []
    decision = redecide(m.stop, history, trained, budget)
    rule = {STOP_RULE_TAG: signature(m.stop)}
    if decision.reason is not None and decision.tokens == was:  # the same SAE: only the reason
        tracker.set_tags(live.run_id, {STOP_TAG: decision.reason, **rule})
        return None
    if decision.reason is not None:  # a checkpoint already trained is the final SAE
        folder = checkpoints_dir(job, m.key) / f"tokens_{decision.tokens:012d}" / SAEGroupFit.artifact
        if not folder.is_dir():
            raise _CannotRedecide(f"its new rule stops it at {decision.tokens:,} tokens, but no "
                                  f"checkpoint is kept there ({folder})")
        out = output_dir(job, SAES, m.key)
        write_folder_atomically(out, lambda tmp: shutil.copytree(folder, tmp, dirs_exist_ok=True))
        new = _replace(tracker, m, path, decision.tokens)
        tracker.log_artifacts(new, out, SAEGroupFit.artifact)
        tracker.set_tags(new, {"raysae.tokens_seen": str(decision.tokens), STOP_TAG: decision.reason,
                               REDECIDED_TAG: f"from {was:,} to {decision.tokens:,} tokens: "
                                              f"{decision.reason}", **rule})
        tracker.finish(new)
        log.info("%s: stops at %s tokens (was %s), nothing trained: %s", m.name,
                 f"{decision.tokens:,}", f"{was:,}", decision.reason)
        return None
    state = stop_state_dir(job, m.key, trained)
    if not Path(state).is_dir():
        raise _CannotRedecide(f"its new rule trains it on from {trained:,} tokens, but no training "
                              f"state is kept there ({state}: it stopped before raysae kept "
                              "one); delete its run and checkpoints to train it again")
    run_id = live.run_id
    if path.run_id != run_id or trained != was:
        run_id = _replace(tracker, m, path, trained)
    # RUNNING with the tokens it goes on from until its group finishes it; its features stale
    tracker.set_tags(run_id, {GOING_ON_TAG: str(trained), DONE_TAG: "stale",
                              REDECIDED_TAG: f"from {was:,} tokens: trains on from {trained:,}"})
    log.info("%s: trains on from %s tokens", m.name, f"{trained:,}")
    return dataclasses.replace(m, resume_from=str(state))


def _replace(tracker: Tracker, m: SAERun, path: RunRecord, tokens: int) -> str:
    """A copy of the trajectory's run up to `tokens` replaces every live run of the key."""
    new = tracker.copy_run(path.run_id, tokens, m.parent_run,
                           drop_tags=(DONE_TAG, CONFIG_TAG, GOING_ON_TAG, REDECIDED_TAG))
    for r in tracker.every_run(m.key):
        if r.run_id != new and r.lifecycle_stage == "active":
            tracker.supersede(r.run_id, new)
    return new


def going_on_groups(job: JobConfig, members: list[SAERun], source: str,
                    shards: dict[str, str] | None) -> list[SAEGroupSpec]:
    """The members that train on, grouped by the step they go on from (a group shares one
    stream), each group a Ray Train run of its own, never the finished run of the group the
    member first trained in."""
    by_step: dict[int, list[SAERun]] = {}
    for m in members:
        by_step.setdefault(train_state_counters(m.resume_from)[0], []).append(m)
    return [dataclasses.replace(g, key=f"on-from-step-{step}:{g.key}")
            for step, ms in sorted(by_step.items()) for g in sae_groups(job, ms, source, shards)]
