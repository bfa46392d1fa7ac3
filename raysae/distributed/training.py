"""Ray Train: data-parallel SAE training on activation shards, resumable and tracked in MLflow.

`train_on_ray` builds a `TorchTrainer` whose workers each stream a disjoint slice of the shards
(shard i goes to worker i mod world size), run the pure-torch loop of `raysae.train`, and
average gradients with one all-reduce per step, so every worker holds the same SAE. At every
checkpoint rank 0 evaluates the SAE inside the LM on held-out tokens, logs to MLflow (step =
tokens seen) and reports the checkpoint to Ray Train. The Ray Train run is named after the
training's stable key, so a worker that dies (or a driver that is restarted) resumes from the
last reported checkpoint and the MLflow run found by that key continues; the token budget is met
exactly either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    CheckpointConsistencyMode,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from raysae.activations import fingerprint, heldout_tokens, special_token_ids
from raysae.config import JobConfig, digest, flatten, from_dict, to_dict
from raysae.evaluate import evaluate_sae
from raysae.models import load_lm, load_tokenizer, parse_hook_name
from raysae.sae import SAE, SAEMetadata
from raysae.shards import ActivationReader
from raysae.tracking import Tracker, tracking_uri
from raysae.train import (
    TrainState,
    flops_per_token,
    load_train_state,
    save_train_state,
    train_sae,
)

log = logging.getLogger("raysae.training")


@dataclass(frozen=True)
class TrainSpec:
    """One SAE training: its identity, its data, and where it starts from."""

    key: str
    """Stable identity: the MLflow run key and the Ray Train run name."""
    name: str
    """Readable run name (MLflow UI)."""
    shards_dir: str
    """Activation shard directory of the site the SAE is trained on."""
    init_from: str | None = None
    """SAE folder to start from (transfer), or None for scratch."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra MLflow tags (grid axes)."""
    parent_run: str | None = None
    """MLflow parent run id (a sweep)."""


@dataclass(frozen=True)
class FaultInjection:
    """Chaos testing: hard-kill one worker process once, mid-run, to exercise recovery."""

    kill_at_tokens: int
    """The worker dies when it fetches the batch that crosses this many tokens."""
    marker: str
    """File created just before the kill; its presence means the kill already happened."""
    rank: int = 0
    """Which worker dies."""


@dataclass(frozen=True)
class TrainResult:
    sae_dir: Path
    """The final SAE folder (SAELens format)."""
    run_id: str
    """MLflow run id."""
    metrics: dict[str, float]
    """Evaluation metrics of the final checkpoint."""


def training_key(job: JobConfig, hook: str, init_from: str | None) -> str:
    """A stable identity for a training: its site, its start, and every setting that changes it."""
    setting = {
        "cache": fingerprint(job),
        "sae": to_dict(job.sae),
        "train": to_dict(job.train),
        "init_from": init_from,
    }
    return f"{hook}|{'scratch' if init_from is None else 'transfer'}|{digest(setting)}"


def run_name_for(key: str) -> str:
    """A Ray Train run name derived only from the key: restarts find the same run directory."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return f"{safe[:80]}-{digest(key)}"


def sae_dir_for(job: JobConfig, key: str) -> Path:
    """Where the final SAE of the training with this key is saved."""
    return Path(job.runs_dir).resolve() / "saes" / run_name_for(key)


def checkpoint_saes(job: JobConfig, key: str) -> list[tuple[int, Path]]:
    """(tokens seen, SAE folder) of every checkpoint the training with this key reported, in
    order: Ray Train keeps each one (num_to_keep=None) as `<run name>/tokens_<n>/sae`."""
    run_dir = Path(job.runs_dir).resolve() / "ray_train" / run_name_for(key)
    found = {int(d.parent.name.removeprefix("tokens_")): d for d in run_dir.glob("tokens_*/sae")}
    return sorted(found.items())


def train_on_ray(
    job: JobConfig,
    spec: TrainSpec,
    *,
    max_failures: int = 2,
    fault: FaultInjection | None = None,
    debug_dir: str | None = None,
) -> TrainResult:
    """Train one SAE with Ray Train; idempotent for a given spec.key (a finished run is reused)."""
    tc = job.train
    if tc.batch_size % tc.num_workers:
        raise ValueError(
            f"train.batch_size: {tc.batch_size} is not divisible by train.num_workers "
            f"({tc.num_workers}); each worker takes an equal share of every batch"
        )
    reader = ActivationReader(spec.shards_dir)  # verified before any worker starts
    if len(reader.manifest.shards) < tc.num_workers:
        raise ValueError(
            f"{spec.shards_dir}: {len(reader.manifest.shards)} shards cannot feed "
            f"{tc.num_workers} workers disjoint data; lower cache.shard_tokens or num_workers"
        )
    storage = Path(job.runs_dir).resolve() / "ray_train"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "job": to_dict(job),
            "spec": asdict(spec),
            "uri": tracking_uri(job.runs_dir),
            "fault": asdict(fault) if fault else None,
            "debug_dir": debug_dir,
        },
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            # Below one CPU per worker: on small nodes whole-CPU workers starve Ray's other tasks.
            resources_per_worker=None if tc.use_gpu else {"CPU": 0.5},
        ),
        run_config=RunConfig(
            name=run_name_for(spec.key),
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        final = json.loads((Path(d) / "metrics.json").read_text())
        out = sae_dir_for(job, spec.key)
        SAE.load(Path(d) / "sae").save(out)
    return TrainResult(out, final["run_id"], final["metrics"])


# ---------------------------------------------------------------------------------------------
# On each worker


def _allreduce_mean(params: list[torch.Tensor]) -> None:
    """Average gradients across workers with a single all-reduce of one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _param_digest(sae: SAE) -> str:
    h = hashlib.sha256()
    for p in sae.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _instrumented(
    batches: Iterator[torch.Tensor],
    tokens_seen: int,
    world: int,
    rank: int,
    sae: SAE,
    fault: dict | None,
    debug: list[dict] | None,
) -> Iterator[torch.Tensor]:
    """Wrap the batch stream: chaos kills and per-step debug records (tests only)."""
    for x in batches:
        tokens_seen += len(x) * world
        if fault and rank == fault["rank"] and tokens_seen > fault["kill_at_tokens"]:
            if not os.path.exists(fault["marker"]):
                Path(fault["marker"]).touch()
                os._exit(1)  # a hard death, not an exception: nothing gets cleaned up
        if debug is not None:
            rows = [hashlib.sha256(r.numpy().tobytes()).hexdigest()[:12] for r in x]
            debug.append({"params_before": _param_digest(sae), "rows": rows})
        yield x


class _CheckpointEvaluator:
    """Rank 0's view at a checkpoint: evaluate in the LM, log to MLflow, report to Ray."""

    def __init__(self, job: JobConfig, spec: TrainSpec, sae: SAE, tracker: Tracker, run_id: str):
        self.job, self.spec, self.sae = job, spec, sae
        self.tracker, self.run_id = tracker, run_id
        self.site, self.layer = parse_hook_name(Path(spec.shards_dir).name)
        device = sae.W_enc.device
        self.model = load_lm(job.model, device)
        self.tokens = heldout_tokens(job)
        self.special = special_token_ids(job.model, load_tokenizer(job.model, job.data))
        sample = next(ActivationReader(spec.shards_dir).iter_batches(1024, shuffle=False))
        self.flops_per_token = flops_per_token(sae, sample.to(device), job.train)

    def __call__(self, state: TrainState) -> dict[str, Any]:
        res = evaluate_sae(self.model, self.sae, self.site, self.layer, self.tokens, self.special)
        values = {f"eval/{k}": v for k, v in res.as_dict().items()}
        values["tokens_seen"] = state.tokens_seen
        values["flops"] = self.flops_per_token * state.tokens_seen
        self.tracker.log_metrics(self.run_id, values, step=state.tokens_seen)
        return values


def _worker(config: dict[str, Any]) -> None:
    job = from_dict(JobConfig, config["job"])
    spec = TrainSpec(**config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    reader = ActivationReader(spec.shards_dir)
    d_in, site_name = reader.manifest.d_model, reader.manifest.hook_name
    metadata = SAEMetadata(
        model_name=job.model.name,
        hook_name=site_name,
        context_size=job.data.context_length,
        prepend_bos=job.data.prepend_bos,
        extras={"run_key": spec.key, "init_from": spec.init_from},
    )
    state: TrainState | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_train_state(Path(d) / "state")
    if spec.init_from:
        sae = SAE.init_from(spec.init_from, job.sae, d_in, metadata=metadata, device=device)
    else:
        sae = SAE(job.sae, d_in, metadata=metadata, seed=job.train.seed, device=device)
        if state is None:  # same sample on every worker: identical b_dec everywhere
            sample = next(reader.iter_batches(4096, seed=job.train.seed))
            sae.init_b_dec(sample.to(device))

    mine = reader.manifest.shards[rank::world]
    per_worker = job.train.batch_size // world
    stream = reader.stream(per_worker, seed=job.train.seed + 7919 * rank, shards=mine)
    done_steps = state.step if state is not None else 0
    debug = [] if config["debug_dir"] else None
    batches = _instrumented(
        islice(stream, done_steps, None),
        state.tokens_seen if state is not None else 0,
        world,
        rank,
        sae,
        config["fault"],
        debug,
    )

    tracker = run_id = evaluator = None
    if rank == 0:
        tracker = Tracker(config["uri"], job.name)
        site, layer = parse_hook_name(site_name)
        tags = {
            "raysae.model": job.model.name,
            "raysae.site": site,
            "raysae.layer": str(layer),
            "raysae.hook": site_name,
            "raysae.architecture": job.sae.architecture,
            "raysae.init": spec.init_from or "scratch",
            **spec.tags,
        }
        run_id = tracker.open_run(spec.key, spec.name, tags, flatten(job), spec.parent_run)
        evaluator = _CheckpointEvaluator(job, spec, sae, tracker, run_id)

    def on_metrics(tokens: int, values: dict[str, float]) -> None:
        if rank == 0:
            tracker.log_metrics(run_id, {f"train/{k}": v for k, v in values.items()}, tokens)

    def on_checkpoint(st: TrainState) -> None:
        if rank != 0:
            ray.train.report({"tokens_seen": st.tokens_seen}, checkpoint=None)
            return
        values = evaluator(st)
        with tempfile.TemporaryDirectory() as tmp:
            save_train_state(st, Path(tmp) / "state")
            sae.save(Path(tmp) / "sae")
            record = {"run_id": run_id, "metrics": values}
            (Path(tmp) / "metrics.json").write_text(json.dumps(record))
            ray.train.report(
                values,
                checkpoint=Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"tokens_{st.tokens_seen:012d}",
            )
        # Wait until the controller has registered it: a worker that dies before that would
        # send the run back to the previous checkpoint, costing a whole interval.
        ray.train.get_all_reported_checkpoints(CheckpointConsistencyMode.COMMITTED)

    final = train_sae(
        sae,
        job.train,
        batches,
        on_metrics=on_metrics,
        on_checkpoint=on_checkpoint,
        start_state=state,
        allreduce_grads=_allreduce_mean if world > 1 else None,
        world_size=world,
    )
    if debug is not None:
        path = Path(config["debug_dir"]) / f"rank{rank}-from{done_steps}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"steps": debug, "final": _param_digest(sae), "shards": [s.file for s in mine]}
        path.write_text(json.dumps(record))
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            tracker.log_artifacts(run_id, sae.save(Path(tmp) / "sae"), "sae")
        tracker.set_tags(run_id, {"raysae.tokens_seen": str(final.tokens_seen)})
        tracker.finish(run_id)
