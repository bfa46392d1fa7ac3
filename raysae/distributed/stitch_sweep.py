"""Ray Tune: the model-stitching sweep, its phases declared on `raysae.distributed.study`,
resumable after any interruption.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from raysae.activations import fingerprint
from raysae.config import ConfigError, JobConfig, from_dict, sweep_digest, to_dict
from raysae.distributed.caching import cache_activations
from raysae.distributed.engine import (
    WORKER_CPUS,
    Done,
    Errors,
    FitResult,
    SweepResult,
    fan_out,
    run_groups,
)
from raysae.distributed.features import features_phase, load_task_sets
from raysae.distributed.stitching import StitchRun, StitchSpec, stitch_dir_for, train_stitch_on_ray
from raysae.distributed.study import Phase, Study, StudyRun, run_study
from raysae.distributed.training import (
    SAEGroupSpec,
    SAERun,
    members_of,
    regroup,
    sae_dir_for,
    sae_groups,
    train_on_ray,
)
from raysae.evaluate import evaluate_sae
from raysae.features.targets import FeatureTarget
from raysae.features.tasks import TaskSet
from raysae.models import hook_name, load_lm, validate_sites
from raysae.sae import SAE
from raysae.stitching import grid as stitch_grid
from raysae.stitching import pairs
from raysae.stitching.grid import StitchTrial
from raysae.stitching.stitch import Stitch
from raysae.stopping import threshold_rule
from raysae.tracking import Tracker

log = logging.getLogger("raysae.stitch_sweep")


@dataclass(frozen=True)
class StitchSweep:
    """What every phase of one stitch sweep reads: the job, the sweep's digest, its task sets."""

    job: JobConfig
    digest: str
    """`config.sweep_digest` of the job: the parent run's key, the Tune experiments' names."""
    task_sets: list[TaskSet]


@dataclass(frozen=True)
class StitchGrid:
    """The sweep's grid once its layers are matched: its pairs, its trials, their phases."""

    matches: dict[int, int] | None
    pairs: tuple[tuple[int, int], ...]
    jobs: tuple[JobConfig, JobConfig]
    """The caching jobs of A and B."""
    trials: list[StitchTrial]


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
    return run_study(declare(StitchSweep(job, digest, task_sets)))


def declare(sw: StitchSweep) -> Study:
    """The sweep's phases: the layer match, its grid, the caches, the grid's phases (the fits,
    the zero-shot transfers, the stitched-init SAEs, the probes), features, the stitch FLOPs."""
    job = sw.job
    run = {"fit": functools.partial(_train, sw, "fit"), "zeroshot": functools.partial(_per_pair, _zeroshot_pair),
           "transfer": functools.partial(_train, sw, "transfer"), "probes": functools.partial(_per_pair, _probes_pair)}
    kind = {"fit": "train", "zeroshot": "fan_out", "transfer": "train", "probes": "fan_out"}
    phases = [Phase("match", "derive", functools.partial(_match, sw)),
              Phase("grid", "derive", functools.partial(_grid, sw)),
              Phase("cache", "cache", _cache)]
    phases += [Phase(p, kind[p], run[p], functools.partial(_phase_trials, p))
               for p in stitch_grid.PHASES]
    if job.features is not None:
        phases.append(Phase("features", "features", functools.partial(_features, sw),
                            _feature_targets))
    phases.append(Phase("stitch_flops", "derive", _log_stitch_flops))
    tags = {"raysae.phase": "sweep", "raysae.role": "stitch_sweep",
            "raysae.sweep_kind": stitch_grid.SWEEP_KIND}
    return Study(job, f"stitch_sweep:{sw.digest}", f"{job.name} stitch sweep", tags,
                 stitch_grid.sweep_costs(job), phases, _summary, "stitch_summary.json")


def _summary(run: StudyRun) -> dict[str, Any]:
    g: StitchGrid = run.made["grid"]
    return {"pairs": [list(p) for p in g.pairs], "matches": g.matches, "failed": run.failed,
            "trials": {r: sum(t.role == r for t in g.trials)
                       for roles in stitch_grid.PHASES.values() for r in roles}}


def _match(sw: StitchSweep, run: StudyRun) -> dict[int, int] | None:
    """Each matched A layer's best B layer (a Ray task), its similarity matrix kept on the
    parent run; None without `stitch.match_layers`."""
    assert sw.job.stitch is not None
    if not sw.job.stitch.match_layers:
        return None
    match = ray.get(_match_layers.remote(to_dict(sw.job)))
    run.tracker.log_dict(run.parent, match, "layer_match.json")
    return {int(k): v for k, v in match["best"].items()}


def _grid(sw: StitchSweep, run: StudyRun) -> StitchGrid:
    assert sw.job.stitch is not None
    matches = run.made["match"]
    layer_pairs = stitch_grid.pairs_of(sw.job.stitch, matches)
    job_a, job_b = stitch_grid.cache_jobs(sw.job, layer_pairs)
    trials = stitch_grid.expand(sw.job, (fingerprint(job_a), fingerprint(job_b)), matches)
    return StitchGrid(matches, layer_pairs, (job_a, job_b), trials)


def _cache(run: StudyRun) -> dict[str, dict[str, str]]:
    """A's and B's layers of the pairs, from the same tokens."""
    g: StitchGrid = run.made["grid"]
    job_a, job_b = g.jobs
    dirs = {
        "a": {k: str(v) for k, v in cache_activations(job_a).items()},
        "b": {k: str(v) for k, v in cache_activations(job_b).items()},
    }
    run.tag({"raysae.pairs": str(list(g.pairs))})
    return dirs


def _phase_trials(phase: str, run: StudyRun) -> list[StitchTrial]:
    return stitch_grid.phases(run.made["grid"].trials)[phase]


def _train(sw: StitchSweep, phase: str, run: StudyRun, todo: list[StitchTrial]) -> tuple[Done, Errors]:
    s = sw.job.stitch
    assert s is not None
    groups = _groups(sw.job, todo, run.made["cache"], run.parent)
    return run_groups(sw.job, f"{sw.job.name}-{sw.digest}-stitch-{phase}", groups, _run_group,
                      {"max_failures": s.max_failures}, s.max_failures, _members_of, _regroup)


def _members_of(group: tuple[dict, StitchSpec | SAEGroupSpec]) -> list[str]:
    return members_of(group[1])


def _regroup(group: tuple[dict, StitchSpec | SAEGroupSpec],
             parts: list[list[int]]) -> dict[str, tuple[dict, Any]]:
    return {k: (group[0], v) for k, v in regroup(group[1], parts).items()}


def _per_pair(task: Any, run: StudyRun, todo: list[StitchTrial]) -> tuple[Done, Errors]:
    """One Ray task per stitch pair."""
    assert run.job.stitch is not None
    by_pair: dict[str, list[str]] = {}
    for t in todo:
        by_pair.setdefault(t.pair, []).append(t.key)
    payload = {"job": to_dict(run.job),
               "trials": {t.key: dataclasses.asdict(t) for t in run.made["grid"].trials},
               "dirs": run.made["cache"], "parent": run.parent}
    return fan_out(task, by_pair, payload, max_retries=run.job.stitch.max_failures)


def _feature_targets(run: StudyRun) -> list[FeatureTarget]:
    return pairs.feature_targets([t for t in run.made["grid"].trials if t.key in run.finished])


def _features(sw: StitchSweep, run: StudyRun, targets: list[FeatureTarget]) -> Errors:
    s = sw.job.stitch
    assert s is not None
    return features_phase(sw.job, targets, s.site, sw.task_sets, s.max_failures)[1]


def _log_stitch_flops(run: StudyRun) -> None:
    """Each stitched-init SAE run gets `stitch_flops` and `stitch_flops_dense_equiv`: the
    stitch's FLOPs (its training and its least-squares start), which count against it in the
    FLOPs-to-quality comparison (the small SAE's do not), as run and as a dense implementation
    counts them (the same for a stitch; both kept so every FLOPs metric has its dense twin)."""
    tracker = run.tracker
    for key, stitch_key in pairs.stitch_of(run.made["grid"].trials).items():
        if key not in run.finished:
            continue
        stitch_run = tracker.find(stitch_key)
        logged = tracker.metrics(stitch_run) if stitch_run is not None else {}
        values = {f"stitch_{k}": logged[k] for k in ("flops", "flops_dense_equiv") if k in logged}
        run_id = tracker.find(key)
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
    for large, of_model in saes.items():
        if of_model:
            model_job = stitch_grid.sae_job(job, of_model[0][0], large)  # the stitch caches both
            model_job = dataclasses.replace(
                model_job, train=dataclasses.replace(model_job.train, source="cached"))
            shards = dirs["b" if large else "a"]
            for spec in sae_groups(model_job, [m for _, m in of_model], "cached", shards):
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


@ray.remote(num_cpus=WORKER_CPUS)
def _zeroshot_pair(keys: list[str], payload: dict[str, Any]) -> Done:
    """A's SAEs carried to B through the pair's stitch: saved (the stitched initialisation) and
    evaluated on B with every SAE metric."""
    job_cfg = from_dict(JobConfig, payload["job"])
    s = job_cfg.stitch
    assert s is not None
    tracker = Tracker.for_job(job_cfg)
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
            tokens, special = pairs.heldout(job_cfg)
        stitch_key, sae_key = trial.depends_on
        stitch = Stitch.load(stitch_dir_for(job_cfg, stitch_key))
        sae = pairs.carried_sae(job_cfg, SAE.load(sae_dir_for(job_cfg, sae_key)), stitch, trial)
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
    """Probes, sparse probes, steering and feature classes of one stitch pair
    (`stitching.pairs.pair_analysis`), logged to the pair's run."""
    job_cfg = from_dict(JobConfig, payload["job"])
    s = job_cfg.stitch
    assert s is not None
    tracker = Tracker.for_job(job_cfg)
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
    run_id = tracker.open_run(key, trial.name, trial.tags, {}, payload["parent"])
    with tempfile.TemporaryDirectory() as tmp:
        values = pairs.pair_analysis(job_cfg, trial, stitch, saes, Path(tmp))
        if s.variants is not None:
            tracker.log_artifacts(run_id, tmp, "features")
    tracker.log_metrics(run_id, values, step=0)
    tracker.finish(run_id)
    return {key: values}


@ray.remote(num_cpus=WORKER_CPUS)
def _match_layers(job: dict) -> dict[str, Any]:
    """The layer match (`stitching.pairs.match_layers`), on a worker."""
    return pairs.match_layers(from_dict(JobConfig, job))
