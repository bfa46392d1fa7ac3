"""Ray Tune: the layer-transfer sweep, phase by phase, resumable after any interruption.

Phases follow `raysae.transfer.grid`: cache every layer in one pass (Ray Data), train the scratch SAEs
(a Tune experiment whose trials each fit a Ray Train `TorchTrainer`; each scratch SAE reads
out its row of the zero-shot matrix at its final checkpoint, in the group's evaluation pass;
what no group read out, plain Ray tasks evaluate, one per target layer), fine-tune the transfer and compute-plan trials
from the scratch SAEs (Tune again), then derive per-trial comparisons: normalized CES at every
checkpoint, MMCS against the scratch SAE of the same layer, and the transfer scores.

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
from typing import Any

import ray
import torch

from raysae.activations import fingerprint, heldout_tokens, special_token_ids
from raysae.config import ConfigError, JobConfig, flatten, from_dict, sweep_digest, to_dict
from raysae.distributed.caching import cache_activations
from raysae.distributed.engine import (
    STOP_TAG,
    WORKER_CPUS,
    Done,
    Errors,
    Phase,
    SweepResult,
    fan_out,
    log_plan,
    run_groups,
    run_phases,
)
from raysae.distributed.features import (
    FeatureTarget,
    SAERef,
    load_task_sets,
    run_features_phase,
)
from raysae.distributed.redecide import going_on_groups, redecide_members
from raysae.distributed.training import (
    SAERun,
    alone,
    members_of,
    run_sae_group,
    sae_dir_for,
    sae_groups,
    zero_ablations_path,
)
from raysae.evaluate import evaluate_saes_kept
from raysae.features.attribution import NormFrame, final_norm_frame
from raysae.models import hook_name, load_lm, load_tokenizer, model_dims, run_with_cache
from raysae.sae import SAE
from raysae.stopping import NoTarget, StopRule, transfer_rule
from raysae.tracking import Tracker, tracking_uri
from raysae.transfer import budget_plan, grid, scores

log = logging.getLogger("raysae.sweep")

TOP_K_TOKENS = 10
"""Tokens per feature compared by the transfer score (top/bottom logits, max-activating)."""
SCORE_TOKENS = 16384
"""Held-out tokens the max-activating transfer score reads (its activations at every layer of
the sweep are held at once: 16k x 768 x 12 x 4 bytes = 600 MB at Pythia-160M)."""


def run_sweep(job: JobConfig) -> SweepResult:
    """Run (or resume) every phase of the job's sweep."""
    sweep = job.sweep
    if sweep is None:
        raise ConfigError("sweep: the config has no sweep section")
    digest = sweep_digest(job)
    # validates the declaration before any work (with the model's depth, as `raysae check` does)
    grid.validate(job, sweep, model_dims(job.model)[0])
    trials = grid.expand(job, sweep, grid.base_digest(job, fingerprint(job)))
    by_phase = grid.phases(trials)
    task_sets = load_task_sets(job)  # task files checked and tokenised before any work
    job, why, costs = grid.plan(job)  # the source decided; a cache that cannot fit is refused
    tracker = Tracker.for_runs_dir(job.runs_dir, job.name)
    parent = tracker.open_run(
        f"sweep:{digest}", f"{job.name} sweep", {"raysae.phase": "sweep"}, flatten(job)
    )
    log_plan(tracker, parent, job, why, costs)
    dirs = None
    if job.train.source == "cached":
        dirs = {k: str(v) for k, v in cache_activations(job).items()}
    tracker.set_tags(parent, {"raysae.status.cache": "done" if dirs else "streamed: nothing cached"})

    readouts: dict[str, list[grid.Trial]] = {}  # scratch key -> its zero-shot evaluations
    for t in by_phase["zeroshot"]:
        readouts.setdefault(t.depends_on[0], []).append(t)

    def train(phase: str, todo: list[grid.Trial]) -> tuple[Done, Errors]:
        stop = _stop_rules(job, todo, trials, tracker) if phase == "transfer" else {}
        members = [_member(job, t, parent, readouts.get(t.key, ()), *stop.get(t.key, (None, {})))
                   for t in todo]
        groups = {g.key: g for g in sae_groups(job, members, job.train.source, dirs)}
        # finished members are settled (those finished under another stop rule re-decided,
        # redecide.py); the groups keep their keys (an interrupted one resumes its Ray Train run)
        settled, going_on, refused = redecide_members(job, members, tracker)
        gone = settled.keys() | refused.keys() | {m.key for m in going_on}
        groups = {k: dataclasses.replace(g, members=tuple(m for m in g.members if m.key not in gone))
                  for k, g in groups.items()}
        groups |= {g.key: g for g in going_on_groups(job, going_on, job.train.source, dirs)}
        log.info("phase %s: %d SAEs in %d group(s)", phase,
                 sum(len(g.members) for g in groups.values()), sum(bool(g.members) for g in groups.values()))
        done, errors = run_groups(job, f"{job.name}-{digest}-{phase}", groups, run_sae_group,
                                  {"job": to_dict(job), "max_failures": sweep.max_failures},
                                  sweep.max_failures, members_of, alone)
        return settled | done, errors | refused

    def zeroshot(todo: list[grid.Trial]) -> tuple[Done, Errors]:
        # read by the scratch group at its final checkpoint; left here: those it could not
        # (a scratch SAE trained by an earlier version of the sweep)
        done = {t.key: m for t in todo if (m := tracker.finished_metrics(t.key)) is not None}
        by_layer: dict[str, list[str]] = {}
        for t in (t for t in todo if t.key not in done):  # one task per target layer
            by_layer.setdefault(str(t.layer), []).append(t.key)
        payload = {"job": to_dict(job), "trials": {t.key: dataclasses.asdict(t) for t in todo},
                   "parent": parent}
        more, errors = fan_out(_zeroshot_layer, by_layer, payload, max_retries=sweep.max_failures)
        return done | more, errors

    phases = [Phase(p, by_phase[p], zeroshot if p == "zeroshot" else functools.partial(train, p))
              for p in grid.PHASES]
    finished, failed = run_phases(phases, tracker, parent)
    by_key = {t.key: t for t in trials}
    derived = [t for t in trials if t.phase in ("transfer", "plan") and t.key in finished]
    scratch_ok = not any(t.key in failed for t in trials if t.phase == "scratch")

    planned: list[grid.Trial] = []  # the cheapest plan for the target, run as a phase
    pilot = None
    if sweep.run_budget_plan and scratch_ok:
        _normalized_ces(tracker, derived, by_key, finished)  # the curves the plan reads
        pilot = read_pilot(job, sweep.stop_at.normalized_ces, trials)
        planned = grid.budget_plan_trials(job, sweep, grid.base_digest(job, fingerprint(job)),
                                          trials, pilot.best.transfers)
        done, errors = train("budget_plan", planned)
        finished |= done
        failed |= errors
        tracker.set_tags(parent, {"raysae.status.budget_plan":
                                  f"{len(done)} done, {len(planned) - len(done)} not done"})
        by_key |= {t.key: t for t in planned}
    # one LM load for every transfer's scores (a planned run equal to a B.1 one is that run)
    _derive(job, list({t.key: t for t in [*derived, *planned] if t.key in finished}.values()),
            by_key, finished)

    if job.features is not None:
        trained = {t.key: t for t in [*trials, *planned] if t.trains and t.key in finished}
        failed |= run_features_phase(job, feature_targets(list(trained.values())), sweep.site,
                                     task_sets, sweep.max_failures, tracker, parent)

    summary = {
        "trials": {p: len(ts) for p, ts in by_phase.items()},
        "failed": failed,
        **grid.plan_token_summary(job, sweep, trials),
    }
    if sweep.stop_at is not None:
        summary["early_stopping"] = _stop_summary(tracker, [t for t in derived if t.phase == "transfer"])
        if sweep.stop_at.normalized_ces is not None and scratch_ok:
            summary["budget_plan"] = pilot_plan(job, sweep.stop_at.normalized_ces, trials)
            log.info("%s", summary["budget_plan"])
    if pilot is not None:
        summary["trials"]["budget_plan"] = len(planned)
        summary["budget_plan_run"] = plan_run_summary(tracker, pilot, planned)
        log.info("%s", summary["budget_plan_run"]["text"])
    tracker.log_dict(parent, summary, "sweep_summary.json")
    tracker.finish(parent, "FINISHED" if not failed else "FAILED")
    return SweepResult(parent, finished, failed, summary)


def _stop_summary(tracker: Tracker, trials: list[grid.Trial]) -> dict[str, Any]:
    """Tokens the transfers used against their fixed budgets, and how many stopped early."""
    used = {t.key: int(tracker.tags(tracker.find(t.key))["raysae.tokens_seen"]) for t in trials}
    budget = sum(t.budget for t in trials)
    return {"transfers": len(trials),
            "stopped_early": sum(used[t.key] < t.budget for t in trials),
            "tokens": sum(used.values()), "budget_tokens": budget,
            "saved_fraction": 1 - sum(used.values()) / budget if budget else 0.0}


def _stop_rules(job: JobConfig, todo: list[grid.Trial], trials: list[grid.Trial],
                tracker: Tracker) -> dict[str, tuple[StopRule | None, dict[str, str]]]:
    """`sweep.stop_at` as each transfer trial's rule (with extra tags): its target read from the
    final metrics of the scratch SAE of its layer and of its source read zero-shot there. A trial
    whose references did not finish runs its budget, and its run says why."""
    cfg = job.sweep.stop_at
    if cfg is None:
        return {}
    scratch = {t.layer: t.key for t in trials if t.phase == "scratch"}
    zero_shot = {(t.layer, t.source_layer): t.key for t in trials if t.phase == "zeroshot"}
    needs_refs = cfg.normalized_ces is not None or cfg.within_scratch is not None
    out = {}
    for t in todo:
        refs = [tracker.finished_metrics(k) if k else None
                for k in (scratch.get(t.layer), zero_shot.get((t.layer, t.source_layer)))]
        if needs_refs and None in refs:
            why = (f"no target: the scratch SAE of layer {t.layer} or SAE_{t.source_layer} read "
                   f"zero-shot there did not finish; the budget runs")
            log.warning("%s: %s", t.name, why)
            out[t.key] = (None, {STOP_TAG: why})
            continue
        try:
            out[t.key] = (transfer_rule(cfg, refs[0] or {}, refs[1] or {}), {})
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
    tracker = Tracker(tracking_uri(job.runs_dir), job.name)
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
# Feature-quality phase


def feature_targets(trials: list[grid.Trial]) -> list[FeatureTarget]:
    """One target per trained SAE; a scratch SAE is compared with the SAEs transferred from it
    (the largest budget per direction), the paper's Figure 23."""
    targets = []
    for t in trials:
        children: dict[str, grid.Trial] = {}
        for c in trials:
            if c.phase == "transfer" and c.depends_on == (t.key,):
                best = children.get(c.direction)
                if best is None or c.budget > best.budget:
                    children[c.direction] = c
        compare = tuple(SAERef(c.name, c.key, c.layer) for c in children.values())
        targets.append(FeatureTarget(t.key, t.name, t.layer, compare=compare))
    return targets


# ---------------------------------------------------------------------------------------------
# Derived comparisons


def _normalized_ces(tracker: Tracker, trials: list[grid.Trial], all_trials: dict[str, grid.Trial],
                    finished: Done) -> None:
    """Per transfer trial: its normalized CES (against the scratch SAE of its layer and its
    source read zero-shot there) at every evaluated step not logged yet (a run that trained on
    after a re-decision gets its new steps only). MLflow alone: what a plan reads."""
    scratch_of = {t.layer: t.key for t in all_trials.values() if t.phase == "scratch"}
    zeroshot_of = {(t.layer, t.source_layer): t.key
                   for t in all_trials.values() if t.phase == "zeroshot"}
    for t in trials:
        scratch_key, zs_key = scratch_of.get(t.layer), zeroshot_of.get((t.layer, t.source_layer))
        if scratch_key not in finished or zs_key not in finished:
            continue
        ces_scratch, ces_zero_shot = finished[scratch_key]["eval/ces"], finished[zs_key]["eval/ces"]
        run_id = tracker.find(t.key)
        logged = dict(tracker.history(run_id, "normalized_ces"))
        for step, ces in tracker.history(run_id, "eval/ces"):
            if step not in logged:
                norm = scores.normalized_ces(ces, ces_zero_shot, ces_scratch)
                tracker.log_metrics(run_id, {"normalized_ces": norm}, step=step)


def _derive(job: JobConfig, trials: list[grid.Trial], all_trials: dict[str, grid.Trial],
            finished: Done) -> None:
    """Per transfer trial: normalized CES at every checkpoint, and for its final SAE the MMCS
    with the scratch SAE of the same layer and the transfer scores against its source SAE, all
    logged to its own run. The LM is loaded (and the held-out tokens run through it) only when
    some final SAE has no scores yet."""
    tracker = Tracker(tracking_uri(job.runs_dir), job.name)
    _normalized_ces(tracker, trials, all_trials, finished)
    todo = []
    for t in trials:
        run_id = tracker.find(t.key)
        tokens = int(tracker.tags(run_id).get("raysae.tokens_seen", t.budget))  # stopped: fewer
        if tokens not in dict(tracker.history(run_id, "transfer_score/combined")):
            todo.append((t, run_id, tokens))  # else derived before, for this final SAE
    if not todo:
        return
    scratch_of = {t.layer: t.key for t in all_trials.values() if t.phase == "scratch"}
    model = load_lm(job.model)
    W_U_DV = model.get_output_embeddings().weight.detach().T
    frame = final_norm_frame(model)  # top/bottom logits read through the final norm, as the DLA
    heldout = _heldout_sites(job, model, sorted({t.layer for t, _, _ in todo} |
                                                {t.source_layer for t, _, _ in todo}))
    for t, run_id, tokens in todo:
        values: dict[str, float] = {}
        transferred = SAE.load(sae_dir_for(job, t.key))
        source = SAE.load(sae_dir_for(job, t.depends_on[0]))
        scratch_key = scratch_of.get(t.layer)
        if scratch_key in finished:
            scratch = SAE.load(sae_dir_for(job, scratch_key))
            values["mmcs_vs_scratch"] = scores.mmcs(transferred.W_dec, scratch.W_dec)
        values.update(_transfer_scores(source, transferred, t, W_U_DV, heldout, frame))
        tracker.log_metrics(run_id, values, step=tokens)


@torch.no_grad()
def _heldout_sites(job: JobConfig, model: torch.nn.Module, layers: list[int]
                   ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Activations of (at most SCORE_TOKENS of) the held-out tokens at the sweep's site of each
    layer ([N, d], special tokens dropped) and their token ids: where the max-activating tokens
    are read. One forward, in batches of `cache.batch_size` sequences."""
    tokens = heldout_tokens(job)
    tokens = tokens[: max(1, SCORE_TOKENS // tokens.shape[1])]
    special = torch.tensor(special_token_ids(job.model, load_tokenizer(job.model, job.data)))
    keep = ~torch.isin(tokens, special).reshape(-1)
    sites = [(job.sweep.site, layer) for layer in layers]
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for s in range(0, len(tokens), job.cache.batch_size):
        acts = run_with_cache(model, tokens[s : s + job.cache.batch_size], sites)
        for site, layer in zip(sites, layers):
            parts[layer].append(acts[hook_name(*site)].reshape(-1, acts[hook_name(*site)].shape[-1]))
    by_layer = {layer: torch.cat(xs)[keep].float() for layer, xs in parts.items()}
    return by_layer, tokens.reshape(-1)[keep]


@torch.no_grad()
def _transfer_scores(
    source: SAE,
    transferred: SAE,
    trial: grid.Trial,
    W_U_DV: torch.Tensor,
    heldout: tuple[dict[int, torch.Tensor], torch.Tensor],
    frame: NormFrame | None = None,
) -> dict[str, float]:
    """Figure 6: shared top-logit, bottom-logit and max-activating tokens (on held-out tokens)
    per feature index between the source SAE (on its layer) and the transferred one (on the
    target layer), each part and the three combined (the paper's score). Logit tokens read
    the decoder rows through the final norm's `frame` (γ and centring, as the DLA)."""
    k = TOP_K_TOKENS

    def logits(sae: SAE, largest: bool) -> torch.Tensor:
        return scores.top_logit_tokens(sae.W_dec, W_U_DV, k, largest=largest, frame=frame)

    acts, ids = heldout
    parts = {
        "top_logits": (logits(source, True), logits(transferred, True)),
        "bottom_logits": (logits(source, False), logits(transferred, False)),
        "max_activating": tuple(
            scores.max_activating_tokens(sae.encode(acts[layer]), ids, k)
            for sae, layer in ((source, trial.source_layer), (transferred, trial.layer))
        ),
    }
    out = {f"transfer_score/{name}": scores.transfer_score(*pair) for name, pair in parts.items()}
    out["transfer_score/combined"] = scores.combined_transfer_score(list(parts.values()))
    return out


# ---------------------------------------------------------------------------------------------
# The cheapest plan for a target, from a finished (pilot) sweep


@dataclasses.dataclass(frozen=True)
class Pilot:
    """What a finished (pilot) sweep says about a target: the scratch budgets, each defined
    pair's normalized-CES curves, the pairs where it is undefined, and the cheapest plan."""

    target: float
    scratch: dict[int, int]
    curves: dict[tuple[int, int], list[budget_plan.Curve]]
    undefined: list[tuple[int, int]]
    best: budget_plan.BudgetPlan


def read_pilot(job: JobConfig, target: float, trials: list[grid.Trial]) -> Pilot:
    """The cheapest scratch/transfer plan reaching normalized CES >= `target` on every layer
    (`raysae.transfer.budget_plan`), from the finished runs of `trials` in MLflow."""
    tracker = Tracker(tracking_uri(job.runs_dir), job.name)
    scratch: dict[int, int] = {}
    curves: dict[tuple[int, int], list[budget_plan.Curve]] = {}
    ces = {(t.layer, t.source_layer): (tracker.finished_metrics(t.key) or {}).get("eval/ces")
           for t in trials if t.phase in ("scratch", "zeroshot")}
    refs = {(t.layer, t.source_layer): (ces.get((t.layer, t.source_layer)), ces.get((t.layer, None)))
            for t in trials if t.phase in ("transfer", "plan")}
    undefined = sorted(pair for pair, (z, s) in refs.items()
                       if None in (z, s) or not scores.normalized_ces_defined(z, s))
    for t in trials:  # a B.1 plan's own run is a transfer run of its pair too
        if t.phase not in ("scratch", "transfer", "plan"):
            continue
        run_id = tracker.find(t.key)
        if run_id is None or tracker.status(run_id) != "FINISHED":
            if t.phase == "scratch":
                raise ConfigError(f"plan --target: {t.name} has no finished run in experiment "
                                  f"'{job.name}' under {job.runs_dir}; run the sweep first")
            continue
        if t.phase == "scratch":
            scratch[t.layer] = t.budget
        elif (t.layer, t.source_layer) not in undefined:
            curve = sorted(dict(tracker.history(run_id, "normalized_ces")).items())
            curves.setdefault((t.layer, t.source_layer), []).append(curve)
    best = budget_plan.cheapest_plan(scratch, budget_plan.transfer_costs(curves, target))
    return Pilot(target, scratch, curves, undefined, best)


def pilot_plan(job: JobConfig, target: float, trials: list[grid.Trial] | None = None) -> str:
    """`raysae plan CONFIG --target T`: the cheapest plan for the target (`read_pilot`) from the
    job's finished sweep in MLflow (`trials`: its trials, by default those of the config as
    written), against scratch everywhere and the fixed Appendix B.1 plans on the same curves."""
    sweep = job.sweep
    if sweep is None:
        raise ConfigError("plan --target: the config has no sweep section")
    if trials is None:
        trials = grid.expand(job, sweep, grid.base_digest(job, fingerprint(job)))
    pilot = read_pilot(job, target, trials)
    best, undefined = pilot.best, pilot.undefined
    everywhere = best.scratch_everywhere
    lines = [f"plan for normalized CES >= {target:g} on layers {list(sweep.layers)} (from the "
             f"checkpoints of experiment '{job.name}'):",
             f"  scratch on {list(best.scratch)}; "
             + ", ".join(f"L{i}<-L{j} {grid.format_tokens(n)}" for i, (j, n) in
                         sorted(best.transfers.items())),
             *(["  not used (normalized CES undefined: the zero-shot CES is at least the "
                "scratch SAE's): " + ", ".join(f"L{i}<-L{j}" for i, j in undefined)]
               if undefined else []),
             "", "| plan | tokens | saved vs scratch everywhere | worst normalized CES |",
             "|---|---|---|---|",
             f"| cheapest for the target | {best.tokens:,} | {best.saving:.0%} | >= {target:g} |",
             f"| scratch everywhere | {everywhere:,} | 0% | 1 |"]
    for direction in ("forward", "backward"):
        layers, pairs = grid.plan_pairs(sweep, direction)
        for budget in sorted({*sweep.finetune_budgets, grid.plan_budget(job, sweep)}):
            tokens, worst = budget_plan.fixed_plan(list(sweep.layers), pilot.scratch, pilot.curves,
                                                   list(layers), dict(pairs), budget)
            bad = [f"L{i}<-L{j}" for i, j in pairs if (i, j) in undefined]
            meets = (f"undefined at {', '.join(bad)}" if bad else
                     "not measured: no run of its transfers has a checkpoint there (stopped before)"
                     if worst != worst else
                     f"{worst:.3f} ({'meets' if worst >= target else 'misses'} the target)")
            lines.append(f"| B.1 {direction}, {grid.format_tokens(budget)} fine-tuning | "
                         f"{tokens:,} | {1 - tokens / everywhere:.0%} | {meets} |")
    return "\n".join(lines)


def plan_run_summary(tracker: Tracker, pilot: Pilot, planned: list[grid.Trial]) -> dict[str, Any]:
    """The plan run as a phase (`sweep.run_budget_plan`): each planned transfer's normalized
    CES at the end of its own run of the planned tokens, against the target its plan was read
    for (off checkpoints of longer runs, whose schedules differ)."""
    rows = []
    for t in planned:
        run_id = tracker.find(t.key)
        value = dict(tracker.history(run_id, "normalized_ces")).get(t.budget) if run_id else None
        rows.append({"layer": t.layer, "source": t.source_layer, "tokens": t.budget, "key": t.key,
                     "normalized_ces": value,
                     "meets": value is not None and value >= pilot.target - 1e-9})
    best = pilot.best
    lines = [f"the plan run as a phase (each transfer a run of exactly its planned tokens, with "
             f"its own schedule): scratch on {list(best.scratch)}, {best.tokens:,} tokens "
             f"({best.saving:.0%} saved against scratch everywhere); "
             f"{sum(r['meets'] for r in rows)} of {len(rows)} transfers reach normalized CES >= "
             f"{pilot.target:g} when run"]
    if rows:
        lines += ["", "| layer | from | tokens | normalized CES at the end | target met |",
                  "|---|---|---|---|---|"]
    for r in rows:
        value = "n/a" if r["normalized_ces"] is None else f"{r['normalized_ces']:.3f}"
        lines.append(f"| {r['layer']} | {r['source']} | {r['tokens']:,} | {value} | "
                     f"{'yes' if r['meets'] else 'no'} |")
    return {"target": pilot.target, "scratch_layers": list(best.scratch), "tokens": best.tokens,
            "saved_fraction": best.saving, "transfers": rows,
            "all_met": all(r["meets"] for r in rows), "text": "\n".join(lines)}
