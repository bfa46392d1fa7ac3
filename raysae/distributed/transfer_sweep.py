"""Ray Tune: the layer-transfer sweep, phase by phase, resumable after any interruption.

Phases follow `raysae.transfer.grid`: cache every layer in one pass (Ray Data), train the scratch SAEs
(a Tune experiment whose trials each fit a Ray Train `TorchTrainer`), evaluate the zero-shot
matrix (plain Ray tasks, one per target layer), fine-tune the transfer and compute-plan trials
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
import logging
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from raysae.activations import fingerprint, heldout_tokens, special_token_ids
from raysae.config import ConfigError, JobConfig, flatten, from_dict, sweep_digest, to_dict
from raysae.distributed import root_cause
from raysae.distributed.caching import cache_activations
from raysae.distributed.features import FeatureTarget, features_phase, load_task_sets
from raysae.distributed.training import TrainSpec, sae_dir_for, train_on_ray
from raysae.evaluate import evaluate_sae
from raysae.models import hook_name, load_lm, load_tokenizer
from raysae.sae import SAE
from raysae.shards import ActivationReader
from raysae.tracking import Tracker, tracking_uri
from raysae.transfer import grid, scores

log = logging.getLogger("raysae.sweep")

TOP_K_TOKENS = 10
"""Tokens per feature compared by the transfer score (top/bottom logits, max-activating)."""


@dataclasses.dataclass(frozen=True)
class SweepResult:
    parent_run: str
    """MLflow run id of the sweep."""
    finished: dict[str, dict[str, float]]
    """Trial key -> final metrics, for every trial that completed."""
    failed: dict[str, str]
    """Trial key -> why it did not complete (its error, or the failed trial it needed)."""
    summary: dict[str, Any]
    """The compute-plan token summary and per-phase counts."""


def run_sweep(job: JobConfig) -> SweepResult:
    """Run (or resume) every phase of the job's sweep."""
    sweep = job.sweep
    if sweep is None:
        raise ConfigError("sweep: the config has no sweep section")
    digest = sweep_digest(job)
    trials = grid.expand(job, sweep, grid.base_digest(job, fingerprint(job)))  # validates the declaration before any work
    by_phase = grid.phases(trials)
    task_sets = load_task_sets(job)  # task files checked and tokenised before any work
    tracker = Tracker.for_runs_dir(job.runs_dir, job.name)
    parent = tracker.open_run(
        f"sweep:{digest}", f"{job.name} sweep", {"raysae.phase": "sweep"}, flatten(job)
    )
    dirs = {k: str(v) for k, v in cache_activations(job).items()}
    tracker.set_tags(parent, {"raysae.status.cache": "done"})

    finished: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    for phase in grid.PHASES:
        todo = []
        for t in by_phase[phase]:
            missing = [d for d in t.depends_on if d not in finished]
            if missing:
                failed[t.key] = f"skipped: depends on {missing[0]}, which did not finish"
            else:
                todo.append(t)
        if phase == "zeroshot":
            done, errors = _zeroshot_phase(job, todo, dirs, parent)
        else:
            done, errors = _tune_phase(job, phase, digest, todo, dirs, parent)
        finished.update(done)
        failed.update(errors)
        status = f"{len(done)} done, {len(by_phase[phase]) - len(done)} not done"
        tracker.set_tags(parent, {f"raysae.status.{phase}": status})
        log.info("phase %s: %s", phase, status)

    if job.features is not None:
        targets = feature_targets([t for t in trials if t.trains and t.key in finished])
        _, errors = features_phase(job, targets, sweep.site, task_sets, sweep.max_failures)
        failed.update({f"features:{k}": why for k, why in errors.items()})
        status = f"{len(targets) - len(errors)} done, {len(errors)} failed"
        tracker.set_tags(parent, {"raysae.status.features": status})
        log.info("phase features: %s", status)

    derived = [t for t in trials if t.phase in ("transfer", "plan") and t.key in finished]
    _derive(job, derived, {t.key: t for t in trials}, finished, dirs)
    summary = {
        "trials": {p: len(ts) for p, ts in by_phase.items()},
        "failed": failed,
        **grid.plan_token_summary(job, sweep, trials),
    }
    tracker.log_dict(parent, summary, "sweep_summary.json")
    tracker.finish(parent, "FINISHED" if not failed else "FAILED")
    return SweepResult(parent, finished, failed, summary)


# ---------------------------------------------------------------------------------------------
# Training phases: one Tune experiment each


def _spec(job: JobConfig, trial: grid.Trial, dirs: dict[str, str], parent: str) -> TrainSpec:
    site = job.sweep.site
    init = str(sae_dir_for(job, trial.depends_on[0])) if trial.depends_on else None
    return TrainSpec(
        key=trial.key,
        name=trial.name,
        shards_dir=dirs[hook_name(site, trial.layer)],
        init_from=init,
        tags=trial.tags,
        parent_run=parent,
    )


def _train_trial(config: dict[str, Any], job: dict, trials: dict, dirs: dict, parent: str) -> None:
    """A Tune function trainable: fit one Ray Train run for the trial named by config["key"]."""
    job_cfg = from_dict(JobConfig, job)
    trial = grid.Trial(**trials[config["key"]])
    trial_job = dataclasses.replace(job_cfg, train=grid.train_config_for(job_cfg, trial))
    spec = _spec(job_cfg, trial, dirs, parent)
    result = train_on_ray(trial_job, spec, max_failures=job_cfg.sweep.max_failures)
    tune.report({**result.metrics, "out_dir": str(result.sae_dir)})


def _tune_phase(
    job: JobConfig,
    phase: str,
    digest: str,
    todo: list[grid.Trial],
    dirs: dict[str, str],
    parent: str,
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    if not todo:
        return {}, {}
    trainable = tune.with_parameters(
        _train_trial,
        job=to_dict(job),
        trials={t.key: dataclasses.asdict(t) for t in todo},
        dirs=dirs,
        parent=parent,
    )
    name = f"{job.name}-{digest}-{phase}"
    return run_tune_experiment(job, name, [t.key for t in todo], trainable, job.sweep.max_failures)


def run_tune_experiment(
    job: JobConfig, name: str, keys: list[str], trainable: Any, max_failures: int
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """One Tune experiment over trial keys (a grid search on "key"), restored when it already
    exists. The trainable reports its metrics and "out_dir"; returns (done, errors): the
    metrics with a '/' in their name (eval/..., ce/...) and `flops` per finished key, and the
    root cause per failed key."""
    storage = Path(job.runs_dir).resolve() / "tune"
    # the trial only drives; its Train workers ask for their own resources
    trainable = tune.with_resources(trainable, {"CPU": 0.1})
    path = storage / name
    if tune.Tuner.can_restore(path):
        log.info("restoring Tune experiment %s", path)
        tuner = tune.Tuner.restore(
            str(path), trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"key": tune.grid_search(keys)},
            tune_config=tune.TuneConfig(max_concurrent_trials=_concurrency(job)),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(storage),
                failure_config=tune.FailureConfig(max_failures=max_failures),
                verbose=1,
            ),
        )
    done, errors = {}, {}
    for result in tuner.fit():
        key = result.config["key"]
        if result.error is not None:
            errors[key] = f"failed: {root_cause(result.error)}"
        elif result.metrics and "out_dir" in result.metrics:
            done[key] = {
                k: v for k, v in result.metrics.items()
                if ("/" in k or k == "flops") and isinstance(v, int | float)
            }
        else:
            errors[key] = "failed: the trial reported no result"
    return done, errors


def _concurrency(job: JobConfig) -> int:
    """Trials at once: as many Train worker groups as the cluster's CPUs (or GPUs) hold; at most
    two against a sqlite MLflow store, which serialises writers."""
    res = ray.cluster_resources()
    workers = job.train.num_workers
    if job.train.use_gpu:
        n = int(res.get("GPU", 0) // workers)
    else:
        n = int(res.get("CPU", 1) // (0.5 * workers + 0.1))
    if tracking_uri(job.runs_dir).startswith("sqlite:"):
        n = min(n, 2)
    return max(1, n)


# ---------------------------------------------------------------------------------------------
# Zero-shot matrix: plain Ray tasks, one per target layer


@ray.remote(num_cpus=0.5)
def _zeroshot_layer(job: dict, trials: list[dict], parent: str) -> dict[str, Any]:
    job_cfg = from_dict(JobConfig, job)
    tracker = Tracker(tracking_uri(job_cfg.runs_dir), job_cfg.name)
    model = tokens = special = None
    out: dict[str, Any] = {}
    for d in trials:
        trial = grid.Trial(**d)
        run_id = tracker.find(trial.key)
        if run_id is not None and tracker.client.get_run(run_id).info.status == "FINISHED":
            out[trial.key] = {k: v for k, v in tracker.client.get_run(run_id).data.metrics.items()}
            continue
        if model is None:  # load the LM and the held-out tokens once per layer
            model = load_lm(job_cfg.model)
            tokens = heldout_tokens(job_cfg)
            special = special_token_ids(job_cfg.model, load_tokenizer(job_cfg.model, job_cfg.data))
        sae = SAE.load(sae_dir_for(job_cfg, trial.depends_on[0]))
        res = evaluate_sae(model, sae, job_cfg.sweep.site, trial.layer, tokens, special)
        values = {f"eval/{k}": v for k, v in res.as_dict().items()}
        run_id = tracker.open_run(trial.key, trial.name, trial.tags, {}, parent)
        tracker.log_metrics(run_id, values, step=0)
        tracker.finish(run_id)
        out[trial.key] = values
    return out


def _zeroshot_phase(
    job: JobConfig, todo: list[grid.Trial], dirs: dict[str, str], parent: str
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    by_layer: dict[int, list[dict]] = {}
    for t in todo:
        by_layer.setdefault(t.layer, []).append(dataclasses.asdict(t))
    refs = {
        layer: _zeroshot_layer.options(max_retries=job.sweep.max_failures).remote(
            to_dict(job), ts, parent
        )
        for layer, ts in by_layer.items()
    }
    done, errors = {}, {}
    for layer, ref in refs.items():
        try:
            done.update(ray.get(ref))
        except Exception as e:  # one layer's failure does not stop the others
            for d in by_layer[layer]:
                errors[d["key"]] = f"failed: {root_cause(e)}"
    return done, errors


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
        compare = tuple((c.name, c.key, c.layer, False) for c in children.values())
        targets.append(FeatureTarget(t.key, t.name, t.layer, compare=compare))
    return targets


# ---------------------------------------------------------------------------------------------
# Derived comparisons


def _derive(
    job: JobConfig,
    trials: list[grid.Trial],
    all_trials: dict[str, grid.Trial],
    finished: dict[str, dict[str, float]],
    dirs: dict[str, str],
) -> None:
    """Per transfer trial: normalized CES at every checkpoint, MMCS with the scratch SAE of the
    same layer, and the transfer scores against its source SAE, all logged to its own run."""
    if not trials:
        return
    tracker = Tracker(tracking_uri(job.runs_dir), job.name)
    scratch_of = {t.layer: t.key for t in all_trials.values() if t.phase == "scratch"}
    zeroshot_of = {
        (t.layer, t.source_layer): t.key for t in all_trials.values() if t.phase == "zeroshot"
    }
    model = load_lm(job.model)
    W_U_DV = model.get_output_embeddings().weight.detach().T
    for t in trials:
        run_id = tracker.find(t.key)
        if "mmcs_vs_scratch" in tracker.client.get_run(run_id).data.metrics:
            continue  # derived on an earlier submission of this sweep
        values: dict[str, float] = {}
        scratch_key = scratch_of.get(t.layer)
        zs_key = zeroshot_of.get((t.layer, t.source_layer))
        if scratch_key in finished and zs_key in finished:
            ces_scratch = finished[scratch_key]["eval/ces"]
            ces_zero_shot = finished[zs_key]["eval/ces"]
            for m in tracker.client.get_metric_history(run_id, "eval/ces"):
                norm = scores.normalized_ces(m.value, ces_zero_shot, ces_scratch)
                tracker.log_metrics(run_id, {"normalized_ces": norm}, step=m.step)
        transferred = SAE.load(sae_dir_for(job, t.key))
        source = SAE.load(sae_dir_for(job, t.depends_on[0]))
        if scratch_key in finished:
            scratch = SAE.load(sae_dir_for(job, scratch_key))
            values["mmcs_vs_scratch"] = scores.mmcs(transferred.W_dec, scratch.W_dec)
        values.update(_transfer_scores(job, source, transferred, t, W_U_DV, dirs))
        tracker.log_metrics(run_id, values, step=t.budget)


@torch.no_grad()
def _transfer_scores(
    job: JobConfig,
    source: SAE,
    transferred: SAE,
    trial: grid.Trial,
    W_U_DV: torch.Tensor,
    dirs: dict[str, str],
) -> dict[str, float]:
    """Figure 6: shared top-logit, bottom-logit and max-activating tokens per feature index
    between the source SAE (on its layer) and the transferred one (on the target layer)."""
    k = TOP_K_TOKENS
    out = {
        "transfer_score/top_logits": scores.transfer_score(
            scores.top_logit_tokens(source.W_dec, W_U_DV, k),
            scores.top_logit_tokens(transferred.W_dec, W_U_DV, k),
        ),
        "transfer_score/bottom_logits": scores.transfer_score(
            scores.top_logit_tokens(source.W_dec, W_U_DV, k, largest=False),
            scores.top_logit_tokens(transferred.W_dec, W_U_DV, k, largest=False),
        ),
    }
    site = job.sweep.site
    tables = []
    for sae, layer in ((source, trial.source_layer), (transferred, trial.layer)):
        reader = ActivationReader(dirs[hook_name(site, layer)])
        table = reader.read_shard(reader.manifest.shards[0])
        feats = sae.encode(reader.vectors(table).float())
        ids = torch.from_numpy(table.column("token_id").to_numpy())
        tables.append(scores.max_activating_tokens(feats, ids, k))
    out["transfer_score/max_activating"] = scores.transfer_score(*tables)
    return out
