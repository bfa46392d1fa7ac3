"""Ray: the feature-quality phase of a sweep, one Ray task per trained SAE.

Each task evaluates the SAE's task circuits (`raysae.features.circuits`: attribution patching,
faithfulness and completeness per circuit size, each over its own list of sizes, direct logit
attribution, the attribution patching check against exact patching) at every training
checkpoint, logged to the SAE's own MLflow run with step = tokens seen, so the figures line up
with the reconstruction metrics of the same run; the final checkpoint's per-feature view (mean
IE, mean DLA, how often each feature is in a circuit of the smallest faithfulness size) is the
`circuits/features.parquet` artifact. It then
writes the feature dashboard of the final SAE (`raysae.features.dashboard`) and,
for an SAE that others were transferred from, the comparison view beside them (the same feature
indices, the paper's Figure 23); both are kept under `<runs_dir>/dashboards/` and logged as the
run's `dashboard/` and `dashboard_compare/` artifacts.

Resumable at checkpoint granularity: a checkpoint's metrics are logged in one batch, those
already logged are skipped, and a run tagged `raysae.features=done` is settled on the driver,
with no task started, while the `features` settings are unchanged (their digest is the
`raysae.features.config` tag);
changed settings re-evaluate every checkpoint, and the training runs themselves are untouched.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import polars as pl
import ray
import torch

from raysae.activations import heldout_tokens, special_token_ids
from raysae.config import ConfigError, JobConfig, digest, from_dict, to_dict
from raysae.distributed.engine import WORKER_CPUS, fan_out, run_name_for
from raysae.distributed.training import checkpoint_saes, sae_dir_for
from raysae.features import circuits, dashboard
from raysae.features.targets import FeatureTarget
from raysae.features.tasks import TaskSet, load_tasks
from raysae.models import hook_name, load_lm, load_tokenizer
from raysae.sae import SAE
from raysae.tracking import Tracker

log = logging.getLogger("raysae.features")

DONE_TAG = "raysae.features"
CONFIG_TAG = "raysae.features.config"


def load_task_sets(job: JobConfig) -> list[TaskSet]:
    """Every task set of `job.features`, tokenised with the job's tokenizer; raises before any
    expensive work when a source is missing, unreadable or yields too few examples."""
    fc = job.features
    if fc is None or not fc.tasks:
        return []
    tokenizer = load_tokenizer(job.model, job.data)
    sets: list[TaskSet] = []
    for source in fc.tasks:
        sets += load_tasks(source, tokenizer, fc.examples_per_task, seed=job.train.seed,
                           prepend_bos=job.data.prepend_bos)
    names = [t.name for t in sets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"features.tasks: task {repeated[0]!r} comes from two sources "
                          f"{list(fc.tasks)}; each task name must be unique")
    return sets


def features_phase(
    job: JobConfig,
    targets: list[FeatureTarget],
    site: str,
    task_sets: list[TaskSet],
    max_retries: int = 2,
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Evaluate every target (Ray tasks, concurrently); returns (done, errors) by key: the final
    checkpoint's `circuit/mean/...` metrics, or why the evaluation failed."""
    fc = job.features
    if fc is None or not targets:
        return {}, {}
    tracker = Tracker.for_job(job)
    settings = digest(to_dict(fc))
    settled = {t.key: m for t in targets
               if (m := _settled(tracker, tracker.find(t.key), settings)) is not None}
    todo = [t for t in targets if t.key not in settled]
    if settled:
        log.info("features: %d SAEs evaluated under these settings already, %d to evaluate",
                 len(settled), len(todo))
    if not todo:  # a re-submitted sweep: no task to start
        return settled, {}
    gpu = 1 if job.train.use_gpu else 0
    groups = {t.key: [t.key] for t in todo}
    done, errors = fan_out(_evaluate_sae, groups, to_dict(job), {t.key: t for t in todo}, site,
                           ray.put(task_sets), max_retries=max_retries,
                           error_prefix="features failed", num_gpus=gpu)
    return {**settled, **done}, errors


def _settled(tracker: Tracker, run_id: str | None, settings: str) -> dict[str, float] | None:
    """The final `circuit/mean/...` metrics of a run whose features were evaluated under these
    `features` settings (tags `raysae.features=done`, `raysae.features.config`); else None."""
    if run_id is None:
        return None
    tags = tracker.tags(run_id)
    if tags.get(CONFIG_TAG) != settings or tags.get(DONE_TAG) != "done":
        return None
    return {k: v for k, v in tracker.metrics(run_id).items() if k.startswith("circuit/mean/")}


@ray.remote(num_cpus=WORKER_CPUS)
def _evaluate_sae(
    keys: list[str], job_d: dict, targets: dict[str, FeatureTarget], site: str,
    task_sets: list[TaskSet],
) -> dict[str, dict[str, float]]:
    (key,) = keys
    job, target = from_dict(JobConfig, job_d), targets[key]
    tracker = Tracker.for_job(job)
    run_id = tracker.find(target.key)
    if run_id is None:
        raise RuntimeError(f"no MLflow run carries the key {target.key!r}")
    settings = digest(to_dict(job.features))
    if (settled := _settled(tracker, run_id, settings)) is not None:  # a retried task
        return {key: settled}
    fresh = tracker.tags(run_id).get(CONFIG_TAG) != settings  # first visit, or new settings
    tracker.set_tags(run_id, {CONFIG_TAG: settings, DONE_TAG: "running"})
    return {key: FeatureEvaluation(job, site, task_sets, tracker).run(target, run_id, redo=fresh)}


class FeatureEvaluation:
    """The models, tokens and task sets one Ray task needs, each loaded once."""

    def __init__(self, job: JobConfig, site: str, task_sets: list[TaskSet], tracker: Tracker):
        self.job, self.fc, self.site, self.tasks, self.tracker = job, job.features, site, task_sets, tracker
        use_gpu = job.train.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.tokenizer = load_tokenizer(job.model, job.data)  # a stitch pair shares it
        self.special = special_token_ids(job.model, self.tokenizer)
        self._models: dict[bool, torch.nn.Module] = {}

    def model(self, large: bool) -> torch.nn.Module:
        """The job's model, or the stitch sweep's large model B."""
        if large not in self._models:
            cfg = self.job.stitch.large if large else self.job.model
            self._models[large] = load_lm(cfg, self.device)
        return self._models[large]

    def run(self, target: FeatureTarget, run_id: str, redo: bool) -> dict[str, float]:
        """Circuits (all checkpoints when `redo`, else those not logged yet), dashboards."""
        final: dict[str, float] = {}
        if self.tasks:
            final = self.circuits(target, run_id, redo)
        if self.fc.dashboard_features > 0:
            self.dashboards(target, run_id)
        self.tracker.set_tags(run_id, {DONE_TAG: "done"})
        return final

    def circuits(self, target: FeatureTarget, run_id: str, redo: bool) -> dict[str, float]:
        """Circuit metrics at every checkpoint not yet logged; the last one's means."""
        ckpts = checkpoint_saes(self.job, target.key)
        trained = self.tracker.tags(run_id).get("raysae.tokens_seen")
        if trained is not None:  # a re-decided stop keeps the checkpoints trained beyond it
            ckpts = [(tokens, folder) for tokens, folder in ckpts if tokens <= int(trained)]
        if self.fc.checkpoints == "final" or not ckpts:
            tokens = ckpts[-1][0] if ckpts else 0
            ckpts = [(tokens, sae_dir_for(self.job, target.key))]
        history = self.tracker.history(run_id, "circuit/mean/m_model")
        logged = set() if redo else {step for step, _ in history}
        values: dict[str, float] = {}
        for tokens, folder in ckpts:
            if tokens in logged:
                continue
            final = tokens == ckpts[-1][0]
            sae = SAE.load(folder, device=self.device)
            sizes = circuits.resolve_n(self.fc.faithfulness_n, sae.d_sae)
            complement = circuits.resolve_n(self.fc.completeness_n, sae.d_sae)
            results = [
                circuits.evaluate_circuits(
                    self.model(target.large), sae, self.site, target.layer, task, sizes,
                    self.special,
                    exact_check=self.fc.exact_check_features, batch_size=self.fc.batch_size,
                    min_effect=self.fc.min_feature_effect, completeness_sizes=complement,
                )
                for task in self.tasks
            ]
            values = {k: v for r in results for k, v in r.metrics().items()}
            values |= circuits.mean_over_tasks(results)
            if final:  # the per-feature view, before the metrics that mark the step as done
                table = pl.DataFrame(circuits.circuit_feature_table(results, sizes[0]))
                with tempfile.TemporaryDirectory() as tmp:
                    table.write_parquet(Path(tmp) / "features.parquet")
                    self.tracker.log_artifacts(run_id, tmp, "circuits")
            self.tracker.log_metrics(run_id, values, step=tokens)  # one batch per checkpoint
        return {k: v for k, v in values.items() if k.startswith("circuit/mean/")}

    def dashboards(self, target: FeatureTarget, run_id: str) -> None:
        """The final SAE's dashboard, and the comparison with the SAEs transferred from it."""
        job = self.job
        tokens = heldout_tokens(job)
        decode = dashboard.token_decoder(self.tokenizer)
        root = Path(job.runs_dir).resolve() / "dashboards"

        def stats(key: str, layer: int, large: bool, features: list[int] | None = None):
            sae = SAE.load(sae_dir_for(job, key), device=self.device)
            found, _ = dashboard.collect_feature_stats(
                self.model(large), sae, self.site, layer, tokens, self.special, features=features,
                n_features=self.fc.dashboard_features, n_contexts=self.fc.dashboard_contexts,
                batch_size=self.fc.batch_size, seed=job.train.seed,
            )
            return sae, found

        sae, own = stats(target.key, target.layer, target.large)
        model_name = job.stitch.large.name if target.large else job.model.name
        meta = {"model": model_name, "hook": hook_name(self.site, target.layer),
                "run": target.name, "d_sae": str(sae.d_sae),
                "architecture": sae.cfg.architecture, "tokens scanned": str(tokens.numel())}
        out = dashboard.write_dashboard(own, root / run_name_for(target.key), decode,
                                        f"{job.name}: {target.name}", meta)
        self.tracker.log_artifacts(run_id, out, "dashboard")
        if target.compare:
            indices = [s.index for s in own]
            columns: list[tuple[str, Any]] = [(target.name, own)]
            for ref in target.compare:
                columns.append((ref.label, stats(ref.key, ref.layer, ref.large, indices)[1]))
            out = dashboard.write_comparison(
                columns, root / f"{run_name_for(target.key)}-compare", decode,
                f"{job.name}: {target.name} beside the SAEs transferred from it", meta,
            )
            self.tracker.log_artifacts(run_id, out, "dashboard_compare")
