"""Ray Tune: the layer-transfer sweep, its phases declared on `raysae.distributed.study`,
resumable after any interruption.

Phases follow `raysae.transfer.grid`: cache every layer in one pass (Ray Data), train the scratch SAEs
(a Tune experiment whose trials each fit a Ray Train `TorchTrainer`; each scratch SAE reads
out its row of the zero-shot matrix at its final checkpoint, in the group's evaluation pass;
what no group read out, plain Ray tasks evaluate, one per target layer), fine-tune the transfer and compute-plan trials
from the scratch SAEs (Tune again); with `sweep.run_budget_plan`, read the cheapest plan for the
target off the transfers' curves (`raysae.transfer.pilot`) and train it; then derive per-trial
comparisons (`raysae.transfer.derived`): normalized CES at every checkpoint, MMCS against the
scratch SAE of the same layer, and the transfer scores; then the feature phase.

Idempotence comes from stable keys at three levels: each phase's Tune experiment directory is
named after the sweep digest (a re-submitted sweep restores it, finished trials are not re-run),
each Ray Train run is named after its trial key (an interrupted training resumes from its last
checkpoint), and each MLflow run is found again by its key tag (no duplicate runs). A trial that
still fails after its retries is reported; trials that depend on it are skipped, the rest run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from raysae.activations import fingerprint, heldout_tokens, special_token_ids
from raysae.config import ConfigError, JobConfig, from_dict, sweep_digest, to_dict
from raysae.distributed.caching import cache_activations
from raysae.distributed.engine import STOP_TAG, WORKER_CPUS, Done, Errors, SweepResult, fan_out
from raysae.distributed.features import features_phase, load_task_sets
from raysae.distributed.study import Phase, Study, StudyRun, run_study, train_saes
from raysae.distributed.training import SAERun, sae_dir_for, zero_ablations_path
from raysae.evaluate import evaluate_saes_kept
from raysae.features.attribution import final_norm_frame
from raysae.features.targets import FeatureTarget
from raysae.features.tasks import TaskSet
from raysae.models import hook_name, load_lm, load_tokenizer, model_dims
from raysae.sae import SAE
from raysae.stopping import NoTarget, StopRule, transfer_rule
from raysae.tracking import Tracker
from raysae.transfer import grid, scores
from raysae.transfer.derived import heldout_sites, new_normalized_ces, transfer_scores
from raysae.transfer.pilot import budget_plan_report, budget_plan_run_summary, read_pilot

log = logging.getLogger("raysae.sweep")


@dataclass(frozen=True)
class TransferSweep:
    """What every phase of one layer-transfer sweep reads: the job (its activation source
    decided), the sweep's digest, its grid and its task sets."""

    job: JobConfig
    digest: str
    """`config.sweep_digest` of the job as submitted: the parent run's key, the Tune names."""
    trials: list[grid.Trial]
    task_sets: list[TaskSet]


def run_sweep(job: JobConfig) -> SweepResult:
    """Run (or resume) every phase of the job's sweep."""
    sweep = job.sweep
    if sweep is None:
        raise ConfigError("sweep: the config has no sweep section")
    digest = sweep_digest(job)
    # validates the declaration before any work (with the model's depth, as `raysae check` does)
    grid.validate(job, sweep, model_dims(job.model)[0])
    trials = grid.expand(job, sweep, grid.base_digest(job, fingerprint(job)))
    grid.phases(trials)  # every dependency in an earlier phase
    task_sets = load_task_sets(job)  # task files checked and tokenised before any work
    job, why, costs = grid.sweep_costs(job)  # the source decided; a cache that cannot fit is refused
    return run_study(declare(TransferSweep(job, digest, trials, task_sets), why, costs))


def declare(s: TransferSweep, why: str, costs: Sequence[Any]) -> Study:
    """The sweep's phases: cache, the grid's phases, the budget plan's, derive, features."""
    job, sweep = s.job, s.job.sweep
    assert sweep is not None
    by_phase = grid.phases(s.trials)
    phases = [Phase("cache", "cache", functools.partial(_cache, s))]
    phases += [Phase(p, "fan_out", functools.partial(_zeroshot, s), by_phase[p]) if p == "zeroshot"
               else Phase(p, "train", functools.partial(_train, s, p), by_phase[p])
               for p in grid.PHASES]
    if sweep.run_budget_plan:  # the cheapest plan for the target, run as a phase
        phases += [Phase("pilot", "derive", functools.partial(_pilot, s), needs=("scratch",)),
                   Phase("budget_plan", "train", functools.partial(_train, s, "budget_plan"),
                         functools.partial(_budget_plan_trials, s), needs=("scratch",))]
    phases.append(Phase("derive", "derive", functools.partial(_derive, s)))
    if job.features is not None:
        phases.append(Phase("features", "features", functools.partial(_features, s),
                            functools.partial(_feature_targets, s)))
    return Study(job, f"sweep:{s.digest}", f"{job.name} sweep", {"raysae.phase": "sweep"},
                 (job, why, costs), phases, functools.partial(_summary, s), "sweep_summary.json")


def _summary(s: TransferSweep, run: StudyRun) -> dict[str, Any]:
    """Trials per phase, what failed, the B.1 plans' tokens; with `stop_at`, the tokens saved
    and the cheapest plan for the target; the plan run, where it ran."""
    job, sweep = s.job, s.job.sweep
    assert sweep is not None
    summary = {
        "trials": {p: len(ts) for p, ts in grid.phases(s.trials).items()},
        "failed": run.failed,
        **grid.compute_plan_summary(job, sweep, s.trials),
    }
    if sweep.stop_at is not None:
        transfers = [t for t in _derived(run) if t.phase == "transfer"]
        summary["early_stopping"] = _stop_summary(run.tracker, transfers)
        if sweep.stop_at.normalized_ces is not None and run.all_finished("scratch"):
            summary["budget_plan"] = budget_plan_report(job, sweep.stop_at.normalized_ces, s.trials,
                                                run.tracker)
            log.info("%s", summary["budget_plan"])
    pilot = run.made.get("pilot")
    if pilot is not None:
        planned = run.trials["budget_plan"]
        summary["trials"]["budget_plan"] = len(planned)
        summary["budget_plan_run"] = budget_plan_run_summary(run.tracker, pilot, planned)
        log.info("%s", summary["budget_plan_run"]["text"])
    return summary


def _stop_summary(tracker: Tracker, trials: list[grid.Trial]) -> dict[str, Any]:
    """Tokens the transfers used against their fixed budgets, and how many stopped early."""
    used = {t.key: int(tracker.tags(tracker.find(t.key))["raysae.tokens_seen"]) for t in trials}
    budget = sum(t.budget for t in trials)
    return {"transfers": len(trials),
            "stopped_early": sum(used[t.key] < t.budget for t in trials),
            "tokens": sum(used.values()), "budget_tokens": budget,
            "saved_fraction": 1 - sum(used.values()) / budget if budget else 0.0}


def _derived(run: StudyRun) -> list[grid.Trial]:
    """The grid's transfer and plan trials that finished: those the derive step scores."""
    return [t for p in ("transfer", "plan") for t in run.trials[p] if t.key in run.done[p]]


# ---------------------------------------------------------------------------------------------
# The phases


def _cache(s: TransferSweep, run: StudyRun) -> dict[str, str] | None:
    """Every layer's activations in one pass, when the sweep reads them cached."""
    if s.job.train.source != "cached":
        heldout_tokens(s.job)  # read once, here, for every group, zero-shot and feature task
        return None
    return {k: str(v) for k, v in cache_activations(s.job).items()}


def _train(s: TransferSweep, phase: str, run: StudyRun, todo: list[grid.Trial]
           ) -> tuple[Done, Errors]:
    """A phase's SAEs as groups: a scratch SAE reads out its zero-shot row, a transfer may
    stop early by `sweep.stop_at`."""
    job = s.job
    assert job.sweep is not None
    stop = _stop_rules(s, run.tracker, todo) if phase == "transfer" else {}
    readouts: dict[str, list[grid.Trial]] = {}  # scratch key -> its zero-shot evaluations
    for t in s.trials:
        if t.phase == "zeroshot":
            readouts.setdefault(t.depends_on[0], []).append(t)
    members = [_member(job, t, run.parent, readouts.get(t.key, ()), *stop.get(t.key, (None, {})))
               for t in todo]
    return train_saes(run, phase, f"{job.name}-{s.digest}-{phase}", members, run.made["cache"],
                      job.sweep.max_failures)


def _zeroshot(s: TransferSweep, run: StudyRun, todo: list[grid.Trial]) -> tuple[Done, Errors]:
    """Read by the scratch group at its final checkpoint; left here: those it could not (a
    scratch SAE trained by an earlier version of the sweep), one Ray task per target layer."""
    done = {t.key: m for t in todo if (m := run.tracker.finished_metrics(t.key)) is not None}
    by_layer: dict[str, list[str]] = {}
    for t in (t for t in todo if t.key not in done):
        by_layer.setdefault(str(t.layer), []).append(t.key)
    payload = {"job": to_dict(s.job), "trials": {t.key: dataclasses.asdict(t) for t in todo},
               "parent": run.parent}
    assert s.job.sweep is not None
    more, errors = fan_out(_zeroshot_layer, by_layer, payload, max_retries=s.job.sweep.max_failures)
    return done | more, errors


def _pilot(s: TransferSweep, run: StudyRun) -> Any:
    """The normalized-CES curves of the finished transfers, and the cheapest plan on them."""
    sweep = s.job.sweep
    assert sweep is not None and sweep.stop_at is not None
    _normalized_ces(run.tracker, _derived(run), s.trials, run.finished)  # the curves it reads
    return read_pilot(s.job, sweep.stop_at.normalized_ces, s.trials, run.tracker)


def _budget_plan_trials(s: TransferSweep, run: StudyRun) -> list[grid.Trial]:
    """The pilot's plan as trials: each planned transfer a run of its planned tokens."""
    job = s.job
    assert job.sweep is not None
    return grid.budget_plan_trials(job, job.sweep, grid.base_digest(job, fingerprint(job)),
                                   s.trials, run.made["pilot"].best.transfers)


def _derive(s: TransferSweep, run: StudyRun) -> None:
    """Every finished transfer's scores; one LM load for all (a planned run equal to a B.1
    one is that run)."""
    planned = run.trials.get("budget_plan", [])
    todo = {t.key: t for t in [*_derived(run), *planned] if t.key in run.finished}
    _derive_scores(s.job, list(todo.values()), s.trials, run.finished, run.tracker)


def _feature_targets(s: TransferSweep, run: StudyRun) -> list[FeatureTarget]:
    planned = run.trials.get("budget_plan", [])
    trained = {t.key: t for t in [*s.trials, *planned] if t.trains and t.key in run.finished}
    return grid.feature_targets(list(trained.values()))


def _features(s: TransferSweep, run: StudyRun, targets: list[FeatureTarget]) -> Errors:
    sweep = s.job.sweep
    assert sweep is not None
    return features_phase(s.job, targets, sweep.site, s.task_sets, sweep.max_failures)[1]


# ---------------------------------------------------------------------------------------------
# The trainings' members


def _stop_rules(s: TransferSweep, tracker: Tracker, todo: list[grid.Trial]
                ) -> dict[str, tuple[StopRule | None, dict[str, str]]]:
    """`sweep.stop_at` as each transfer trial's rule (with extra tags): its target read from the
    final metrics of the scratch SAE of its layer and of its source read zero-shot there. A trial
    whose references did not finish runs its budget, and its run says why."""
    assert s.job.sweep is not None
    cfg = s.job.sweep.stop_at
    if cfg is None:
        return {}
    refs = grid.references(s.trials)
    needs_refs = cfg.normalized_ces is not None or cfg.within_scratch is not None
    out = {}
    for t in todo:
        found = [tracker.finished_metrics(k) if k else None for k in refs.of(t)]
        if needs_refs and None in found:
            why = (f"no target: the scratch SAE of layer {t.layer} or SAE_{t.source_layer} read "
                   f"zero-shot there did not finish; the budget runs")
            log.warning("%s: %s", t.name, why)
            out[t.key] = (None, {STOP_TAG: why})
            continue
        try:
            out[t.key] = (transfer_rule(cfg, found[0] or {}, found[1] or {}), {})
        except NoTarget as e:
            log.warning("%s: %s", t.name, e)
            out[t.key] = (None, {STOP_TAG: f"{e}; the budget runs"})
    return out


def _member(job: JobConfig, trial: grid.Trial, parent: str,
            zeroshot: Sequence[grid.Trial] = (), stop: StopRule | None = None,
            tags: dict[str, str] | None = None) -> SAERun:
    """A training trial (scratch, transfer, plan) as a member of an SAE group; a scratch SAE
    reads out its zero-shot evaluations at its final checkpoint, in the group's evaluation
    pass (the clean forward is shared); a transfer may stop early by `stop`."""
    assert job.sweep is not None
    init = str(sae_dir_for(job, trial.depends_on[0])) if trial.depends_on else None
    readouts = tuple(SAERun(key=z.key, name=z.name, tags=z.tags, parent_run=parent,
                            hook=hook_name(job.sweep.site, z.layer), init_from=init,
                            num_tokens=trial.budget, lr=trial.lr) for z in zeroshot)
    return SAERun(key=trial.key, name=trial.name, tags={**trial.tags, **(tags or {})},
                  parent_run=parent, hook=hook_name(job.sweep.site, trial.layer),
                  init_from=init, num_tokens=trial.budget, lr=trial.lr, readouts=readouts,
                  stop=stop)


@ray.remote(num_cpus=WORKER_CPUS)
def _zeroshot_layer(keys: list[str], payload: dict[str, Any]) -> Done:
    """SAE_j read on layer i for every j, one target layer i per task: the LM and the held-out
    tokens load once, and all SAEs are evaluated in one pass (one clean and one zero-ablated
    forward per batch, shared)."""
    job = from_dict(JobConfig, payload["job"])
    assert job.sweep is not None
    tracker = Tracker.for_job(job)
    trials = {key: grid.Trial(**payload["trials"][key]) for key in keys}
    out: Done = {}
    for key in keys:
        done = tracker.finished_metrics(key)
        if done is not None:
            out[key] = done
    todo = {key: t for key, t in trials.items() if key not in out}
    if not todo:
        return out
    special = special_token_ids(job.model, load_tokenizer(job.model, job.data))
    saes = {key: (SAE.load(sae_dir_for(job, t.depends_on[0])), job.sweep.site, t.layer)
            for key, t in todo.items()}
    results = evaluate_saes_kept(zero_ablations_path(job), load_lm(job.model), saes,
                                 heldout_tokens(job), special)
    for key, trial in todo.items():
        values = {f"eval/{k}": v for k, v in results[key].as_dict().items()}
        run_id = tracker.open_run(trial.key, trial.name, trial.tags, {}, payload["parent"])
        tracker.log_metrics(run_id, values, step=0)
        tracker.finish(run_id)
        out[key] = values
    return out


# ---------------------------------------------------------------------------------------------
# Derived comparisons, logged to each transfer's run


def _normalized_ces(tracker: Tracker, trials: list[grid.Trial], grid_trials: list[grid.Trial],
                    finished: Done) -> None:
    """Per transfer trial: its normalized CES (against the scratch SAE of its layer and its
    source read zero-shot there) at every evaluated step not logged yet (a run that trained on
    after a re-decision gets its new steps only). MLflow alone: what a plan reads."""
    refs = grid.references(grid_trials)
    for t in trials:
        scratch_key, zs_key = refs.of(t)
        if scratch_key not in finished or zs_key not in finished:
            continue
        run_id = tracker.find(t.key)
        logged = {step for step, _ in tracker.history(run_id, "normalized_ces")}
        for step, norm in new_normalized_ces(tracker.history(run_id, "eval/ces"), logged,
                                             finished[zs_key]["eval/ces"],
                                             finished[scratch_key]["eval/ces"]):
            tracker.log_metrics(run_id, {"normalized_ces": norm}, step=step)


def _derive_scores(job: JobConfig, trials: list[grid.Trial], grid_trials: list[grid.Trial],
                   finished: Done, tracker: Tracker) -> None:
    """Per transfer trial: normalized CES at every checkpoint, and for its final SAE the MMCS
    with the scratch SAE of the same layer and the transfer scores against its source SAE, all
    logged to its own run. The LM is loaded (and the held-out tokens run through it) only when
    some final SAE has no scores yet."""
    _normalized_ces(tracker, trials, grid_trials, finished)
    todo = []
    for t in trials:
        run_id = tracker.find(t.key)
        tokens = int(tracker.tags(run_id).get("raysae.tokens_seen", t.budget))  # stopped: fewer
        if tokens not in dict(tracker.history(run_id, "transfer_score/combined")):
            todo.append((t, run_id, tokens))  # else derived before, for this final SAE
    if not todo:
        return
    scratch_of = grid.references(grid_trials).scratch
    model = load_lm(job.model)
    W_U_DV = model.get_output_embeddings().weight.detach().T
    frame = final_norm_frame(model)  # top/bottom logits read through the final norm, as the DLA
    heldout = heldout_sites(job, model, sorted({t.layer for t, _, _ in todo} |
                                               {t.source_layer for t, _, _ in todo}))
    for t, run_id, tokens in todo:
        values: dict[str, float] = {}
        transferred = SAE.load(sae_dir_for(job, t.key))
        source = SAE.load(sae_dir_for(job, t.depends_on[0]))
        scratch_key = scratch_of.get(t.layer)
        if scratch_key in finished:
            scratch = SAE.load(sae_dir_for(job, scratch_key))
            values["mmcs_vs_scratch"] = scores.mmcs(transferred.W_dec, scratch.W_dec)
        values.update(transfer_scores(source, transferred, t, W_U_DV, heldout, frame))
        tracker.log_metrics(run_id, values, step=tokens)
