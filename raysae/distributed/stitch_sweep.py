"""Ray Tune: the model-stitching sweep, phase by phase on the engine, resumable after any
interruption.

Phases follow `raysae.stitching.grid`: the optional layer matching (a Ray task: SVCCA or CKA of
every A layer against every B layer picks each matched A layer's partner), caching of A's and
B's layers from the same tokens (Ray Data), then one Tune experiment that fits the stitches
(Ray Train, `raysae.distributed.stitching`) and trains the SAEs of A and B's scratch SAEs (Ray
Train); A's SAEs carried to B through the stitches and evaluated zero-shot (Ray tasks); B's SAEs
trained from those stitched initialisations (Tune); and per pair the probes, steering vectors
and feature classes (Ray tasks). Resumption works as in the layer-transfer sweep: Tune
experiments named after the sweep digest are restored, Ray Train runs are named after trial
keys, MLflow runs are found by their key tag, and finished evaluations are not repeated.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch

from raysae.activations import fingerprint, heldout_tokens, job_tokens, special_token_ids
from raysae.config import ConfigError, JobConfig, flatten, from_dict, sweep_digest, to_dict
from raysae.distributed.caching import cache_activations
from raysae.distributed.engine import (
    WORKER_CPUS,
    Done,
    Errors,
    FitResult,
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
from raysae.distributed.stitching import StitchRun, StitchSpec, stitch_dir_for, train_stitch_on_ray
from raysae.distributed.training import (
    SAEGroupSpec,
    SAERun,
    alone,
    members_of,
    sae_dir_for,
    sae_groups,
    train_on_ray,
)
from raysae.evaluate import evaluate_sae
from raysae.models import hook_name, load_lm, load_tokenizer, validate_sites
from raysae.sae import SAE
from raysae.stitching import grid as stitch_grid
from raysae.stitching.grid import StitchTrial
from raysae.stitching.stitch import Stitch, transfer_sae
from raysae.stopping import threshold_rule
from raysae.tracking import Tracker, tracking_uri

log = logging.getLogger("raysae.stitch_sweep")


def run_stitch_sweep(job: JobConfig) -> SweepResult:
    """Run (or resume) every phase of the job's stitch sweep."""
    s = job.stitch
    if s is None:
        raise ConfigError("stitch: the config has no stitch section")
    stitch_grid.validate(job)
    layers_a = sorted({p[0] for p in s.pairs} | set(s.match_layers))
    validate_sites(job.model, [s.site], layers_a)
    validate_sites(s.large, [s.site], sorted({p[1] for p in s.pairs}))
    digest = sweep_digest(job)
    task_sets = load_task_sets(job)  # task files checked and tokenised before any work
    tracker = Tracker.for_runs_dir(job.runs_dir, job.name)
    tags = {"raysae.phase": "sweep", "raysae.role": "stitch_sweep",
            "raysae.sweep_kind": stitch_grid.SWEEP_KIND}
    parent = tracker.open_run(f"stitch_sweep:{digest}", f"{job.name} stitch sweep", tags, flatten(job))
    log_plan(tracker, parent, *stitch_grid.plan(job))

    matches = None
    if s.match_layers:
        match = ray.get(_match_layers.remote(to_dict(job)))
        tracker.log_dict(parent, match, "layer_match.json")
        matches = {int(k): v for k, v in match["best"].items()}
    pairs = stitch_grid.pairs_of(s, matches)
    job_a, job_b = stitch_grid.cache_jobs(job, pairs)
    trials = stitch_grid.expand(job, (fingerprint(job_a), fingerprint(job_b)), matches)
    dirs = {
        "a": {k: str(v) for k, v in cache_activations(job_a).items()},
        "b": {k: str(v) for k, v in cache_activations(job_b).items()},
    }
    tracker.set_tags(parent, {"raysae.status.cache": "done", "raysae.pairs": str(list(pairs))})

    payload = {"job": to_dict(job), "trials": {t.key: dataclasses.asdict(t) for t in trials},
               "dirs": dirs, "parent": parent}

    def train(phase: str, todo: list[StitchTrial]) -> tuple[Done, Errors]:
        return run_groups(job, f"{job.name}-{digest}-stitch-{phase}", _groups(job, todo, dirs, parent),
                          _run_group, {"max_failures": s.max_failures}, s.max_failures,
                          lambda g: members_of(g[1]), lambda g: {k: (g[0], v) for k, v in alone(g[1]).items()})

    def per_pair(task: Any, todo: list[StitchTrial]) -> tuple[Done, Errors]:
        by_pair: dict[str, list[str]] = {}
        for t in todo:
            by_pair.setdefault(t.pair, []).append(t.key)
        return fan_out(task, by_pair, payload, max_retries=s.max_failures)

    run = {"fit": functools.partial(train, "fit"), "zeroshot": functools.partial(per_pair, _zeroshot_pair),
           "transfer": functools.partial(train, "transfer"), "probes": functools.partial(per_pair, _probes_pair)}
    phases = [Phase(p, ts, run[p]) for p, ts in stitch_grid.phases(trials).items()]
    finished, failed = run_phases(phases, tracker, parent)

    if job.features is not None:
        targets = stitch_feature_targets([t for t in trials if t.key in finished])
        failed |= run_features_phase(job, targets, s.site, task_sets, s.max_failures, tracker, parent)

    _log_stitch_flops(job, trials, finished, tracker)
    summary = {"pairs": [list(p) for p in pairs], "matches": matches, "failed": failed,
               "trials": {r: sum(t.role == r for t in trials)
                          for roles in stitch_grid.PHASES.values() for r in roles}}
    tracker.log_dict(parent, summary, "stitch_summary.json")
    tracker.finish(parent, "FINISHED" if not failed else "FAILED")
    return SweepResult(parent, finished, failed, summary)


def stitch_feature_targets(trials: list[StitchTrial]) -> list[FeatureTarget]:
    """One target per SAE of the sweep (A's, B's scratch, zero-shot and stitched-init ones); an
    SAE of A is compared with its twins on B: the zero-shot transfer and, per zero-shot, the
    stitched-init SAE of the largest budget (the same feature indices, carried by the stitch)."""
    targets = []
    for t in trials:
        if t.role not in ("scratch_a", "scratch_b", "zeroshot", "transfer"):
            continue
        compare: list[SAERef] = []
        if t.role == "scratch_a":
            for z in trials:
                if z.role == "zeroshot" and t.key in z.depends_on:
                    compare.append(SAERef(z.name, z.key, z.layer_b, True))
                    grown = [c for c in trials if c.role == "transfer" and c.depends_on == (z.key,)]
                    if grown:
                        c = max(grown, key=lambda c: c.budget)
                        compare.append(SAERef(c.name, c.key, c.layer_b, True))
        large = t.role != "scratch_a"
        layer = t.layer_b if large else t.layer_a
        targets.append(FeatureTarget(t.key, t.name, layer, large, tuple(compare)))
    return targets


def _log_stitch_flops(job: JobConfig, trials: list[StitchTrial], finished: dict, tracker: Tracker) -> None:
    """Each stitched-init SAE run gets `stitch_flops` and `stitch_flops_dense_equiv`: the
    stitch's FLOPs (its training and its least-squares start), which count against it in the
    FLOPs-to-quality comparison (the small SAE's do not), as run and as a dense implementation
    counts them (the same for a stitch; both kept so every FLOPs metric has its dense twin)."""
    by_key = {t.key: t for t in trials}
    for t in trials:
        if t.role != "transfer" or t.key not in finished:
            continue
        stitch_key = by_key[t.depends_on[0]].depends_on[0]
        stitch_run = tracker.find(stitch_key)
        logged = tracker.metrics(stitch_run) if stitch_run is not None else {}
        values = {f"stitch_{k}": logged[k] for k in ("flops", "flops_dense_equiv") if k in logged}
        run_id = tracker.find(t.key)
        if values and run_id is not None:
            tracker.log_metrics(run_id, values, step=0)


# ---------------------------------------------------------------------------------------------
# Trainings: stitches and SAEs, one Tune trainable


def _groups(job: JobConfig, todo: list[StitchTrial], dirs: dict, parent: str
            ) -> dict[str, tuple[dict, StitchSpec | SAEGroupSpec]]:
    """A phase's trainings as groups, each with the job it runs under: a stitch each, and the
    SAEs of each model (A's; B's scratch and stitched-init ones) packed into groups."""
    s = job.stitch
    out: dict[str, tuple[dict, StitchSpec | SAEGroupSpec]] = {}
    saes: dict[bool, list[tuple[StitchTrial, SAERun]]] = {False: [], True: []}
    for t in todo:
        if t.role == "stitch":
            run = StitchRun(key=t.key, name=t.name, tags=t.tags, parent_run=parent,
                            layer_a=t.layer_a, layer_b=t.layer_b)
            spec = StitchSpec(key=t.key, members=(run,),
                              shards_a=dirs["a"][hook_name(s.site, t.layer_a)],
                              shards_b=dirs["b"][hook_name(s.site, t.layer_b)])
            out[spec.key] = (to_dict(job), spec)
            continue
        large = t.role != "scratch_a"
        # B's SAE from the stitched initialisation starts from the zero-shot trial's saved SAE
        init = str(sae_dir_for(job, t.depends_on[0])) if t.role == "transfer" else None
        layer = t.layer_b if large else t.layer_a
        stop = (threshold_rule(s.ev_thresholds, s.check_every_tokens)
                if large and s.stop_at_thresholds else None)
        saes[large].append((t, SAERun(key=t.key, name=t.name, tags=t.tags, parent_run=parent,
                                       hook=hook_name(s.site, layer), init_from=init,
                                       num_tokens=t.budget, d_sae=t.width, stop=stop)))
    for large, pairs in saes.items():
        if pairs:
            model_job = stitch_grid.sae_job(job, pairs[0][0], large)  # the stitch caches both
            model_job = dataclasses.replace(
                model_job, train=dataclasses.replace(model_job.train, source="cached"))
            shards = dirs["b" if large else "a"]
            for spec in sae_groups(model_job, [m for _, m in pairs], "cached", shards):
                out[spec.key] = (to_dict(model_job), spec)
    return out


def _run_group(key: str, groups: dict, max_failures: int) -> dict[str, FitResult]:
    """A Tune trial's work: fit the stitch or train the SAE group with this key."""
    job, spec = groups[key]
    job_cfg = from_dict(JobConfig, job)
    if isinstance(spec, StitchSpec):
        return {spec.members[0].key: train_stitch_on_ray(job_cfg, spec, max_failures=max_failures)}
    return train_on_ray(job_cfg, spec, max_failures=max_failures)


# ---------------------------------------------------------------------------------------------
# Evaluations: Ray tasks, one per pair


def _heldout(job: JobConfig) -> tuple[torch.Tensor, list[int]]:
    return heldout_tokens(job), special_token_ids(job.model, load_tokenizer(job.model, job.data))


@ray.remote(num_cpus=WORKER_CPUS)
def _zeroshot_pair(keys: list[str], payload: dict[str, Any]) -> Done:
    """A's SAEs carried to B through the pair's stitch: saved (the stitched initialisation) and
    evaluated on B with every SAE metric."""
    job_cfg = from_dict(JobConfig, payload["job"])
    s = job_cfg.stitch
    tracker = Tracker(tracking_uri(job_cfg.runs_dir), job_cfg.name)
    out: Done = {}
    model_b = tokens = special = None
    for key in keys:
        trial = StitchTrial(**payload["trials"][key])
        target = sae_dir_for(job_cfg, key)
        done = tracker.finished_metrics(key)
        if done is not None and target.exists():
            out[key] = done
            continue
        if model_b is None:
            model_b = load_lm(s.large)
            tokens, special = _heldout(job_cfg)
        stitch_key, sae_key = trial.depends_on
        stitch = Stitch.load(stitch_dir_for(job_cfg, stitch_key))
        sae = transfer_sae(SAE.load(sae_dir_for(job_cfg, sae_key)), stitch)
        sae.metadata = dataclasses.replace(
            sae.metadata, model_name=s.large.name, hook_name=hook_name(s.site, trial.layer_b),
            extras={**sae.metadata.extras, "stitched_from": sae_key, "stitch": stitch_key},
        )
        sae.save(target)
        res = evaluate_sae(model_b, sae, s.site, trial.layer_b, tokens, special)
        values = {f"eval/{k}": v for k, v in res.as_dict().items()}
        run_id = tracker.open_run(key, trial.name, trial.tags, {}, payload["parent"])
        tracker.log_metrics(run_id, values, step=0)
        tracker.log_artifacts(run_id, target, "sae")
        tracker.finish(run_id)
        out[key] = values
    return out


@ray.remote(num_cpus=WORKER_CPUS)
def _probes_pair(keys: list[str], payload: dict[str, Any]) -> Done:
    """Probes, sparse probes, steering and feature classes of one stitch pair."""
    from raysae.stitching.feature_classes import class_summary, feature_class_table, load_variants
    from raysae.stitching.probes import load_labelled, probe_and_steer

    job_cfg = from_dict(JobConfig, payload["job"])
    s = job_cfg.stitch
    tracker = Tracker(tracking_uri(job_cfg.runs_dir), job_cfg.name)
    (key,) = keys
    done = tracker.finished_metrics(key)
    if done is not None:
        return {key: done}
    trial = StitchTrial(**payload["trials"][key])
    stitch = Stitch.load(stitch_dir_for(job_cfg, trial.depends_on[0]))
    saes = {}
    for sae_key in trial.depends_on[1:]:
        sae = SAE.load(sae_dir_for(job_cfg, sae_key))
        saes[sae.d_sae] = sae
    model_a, model_b = load_lm(job_cfg.model), load_lm(s.large)
    tokenizer = load_tokenizer(job_cfg.model, job_cfg.data)
    special = special_token_ids(job_cfg.model, tokenizer)
    la, lb = trial.layer_a, trial.layer_b
    values: dict[str, float] = {}
    run_id = tracker.open_run(key, trial.name, trial.tags, {}, payload["parent"])
    if s.probes is not None:
        data = load_labelled(s.probes, tokenizer, job_cfg.data.context_length)
        values |= probe_and_steer(model_a, model_b, stitch, s.site, la, lb, data, s.probes, saes, special)
    if s.variants is not None:
        tokens, _ = _heldout(job_cfg)
        special_t = torch.tensor(special, dtype=torch.long)
        variants = load_variants(s.variants)
        with tempfile.TemporaryDirectory() as tmp:
            for width, sae in saes.items():
                table = feature_class_table(model_a, model_b, sae, stitch, s.site, la, lb, tokens,
                                      ~torch.isin(tokens, special_t), variants,
                                      variants_mask_GVT=~torch.isin(variants, special_t))
                values |= {f"features/w{width}/{k}": v for k, v in class_summary(table).items()}
                table.write_parquet(Path(tmp) / f"w{width}.parquet")
            tracker.log_artifacts(run_id, tmp, "features")
    tracker.log_metrics(run_id, values, step=0)
    tracker.finish(run_id)
    return {key: values}


# ---------------------------------------------------------------------------------------------
# Layer matching


@ray.remote(num_cpus=WORKER_CPUS)
def _match_layers(job: dict) -> dict[str, Any]:
    """Similarity of every layer of A with every layer of B at the stitch site, on held-out
    tokens after the evaluation tokens; the best B layer per matched A layer."""
    from raysae.stitching.matching import best_matches, layer_similarity

    job_cfg = from_dict(JobConfig, job)
    s = job_cfg.stitch
    skip = job_cfg.data.num_tokens + job_cfg.train.eval_tokens
    tokens = torch.from_numpy(job_tokens(job_cfg, s.match_tokens, skip_tokens=skip)).long()
    special = special_token_ids(job_cfg.model, load_tokenizer(job_cfg.model, job_cfg.data))
    mask = ~torch.isin(tokens, torch.tensor(special, dtype=torch.long))
    model_a, model_b = load_lm(job_cfg.model), load_lm(s.large)
    sim = layer_similarity(model_a, model_b, tokens, s.site, s.match_method, mask_NT=mask)
    layers_a, layers_b = list(range(sim.shape[0])), list(range(sim.shape[1]))
    best = best_matches(sim, layers_a, layers_b)
    return {
        "method": s.match_method,
        "layers_a": layers_a,
        "layers_b": layers_b,
        "matrix": sim.tolist(),
        "best": {str(a): best[a] for a in s.match_layers},
    }
