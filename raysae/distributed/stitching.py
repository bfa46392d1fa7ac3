"""Ray Train: fit a stitch between two models' cached activations, resumable and tracked.

Each worker streams its own slice of the shard pairs (A's and B's shards of the same tokens,
checked row by row), runs the pure-torch loop of `raysae.stitching.stitch.train_stitch` and averages
gradients with one all-reduce per step. Every worker starts from the same maps: the closed-form
least-squares fit on the first `stitch.lstsq_tokens` cached rows (or seeded random maps).
Rank 0 logs to MLflow (step = tokens), reports checkpoints, and at the end evaluates the stitch
and its least-squares baseline in both models on held-out tokens. The run is named after the
trial key, so an interrupted fit resumes from its last checkpoint, as SAE trainings do.
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    CheckpointConsistencyMode,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from raysae.activations import heldout_tokens, special_token_ids
from raysae.config import JobConfig, StitchConfig, flatten, from_dict, to_dict
from raysae.distributed.training import _allreduce_mean, run_name_for
from raysae.evaluate import evaluate_stitch
from raysae.models import load_lm, load_tokenizer
from raysae.shards import ActivationReader, aligned_shards, paired_stream
from raysae.stitching.stitch import (
    Stitch,
    flops_per_token,
    load_stitch_state,
    lstsq_stitch,
    save_stitch_state,
    stitch_settings,
    train_stitch,
)
from raysae.tracking import Tracker, tracking_uri


@dataclass(frozen=True)
class StitchSpec:
    """One stitch fit: its identity, its two shard sets and its MLflow placement."""

    key: str
    name: str
    layer_a: int
    layer_b: int
    shards_a: str
    shards_b: str
    tags: dict[str, str] = field(default_factory=dict)
    parent_run: str | None = None


@dataclass(frozen=True)
class StitchResult:
    stitch_dir: Path
    run_id: str
    metrics: dict[str, float]


def stitch_dir_for(job: JobConfig, key: str) -> Path:
    """Where the final stitch of the fit with this key is saved."""
    return Path(job.runs_dir).resolve() / "stitches" / run_name_for(key)


def train_stitch_on_ray(job: JobConfig, spec: StitchSpec, *, max_failures: int = 2) -> StitchResult:
    """Fit one stitch with Ray Train; idempotent for a given spec.key."""
    s = job.stitch
    assert s is not None
    workers = job.train.num_workers
    if s.batch_size % workers:
        raise ValueError(
            f"stitch.batch_size: {s.batch_size} is not divisible by train.num_workers ({workers})"
        )
    pairs = aligned_shards(ActivationReader(spec.shards_a), ActivationReader(spec.shards_b))
    if len(pairs) < workers:
        raise ValueError(
            f"{spec.shards_a}: {len(pairs)} shards cannot feed {workers} workers disjoint data"
        )
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job": to_dict(job), "spec": asdict(spec), "uri": tracking_uri(job.runs_dir)},
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=job.train.use_gpu,
            resources_per_worker=None if job.train.use_gpu else {"CPU": 0.5},
        ),
        run_config=RunConfig(
            name=run_name_for(spec.key),
            storage_path=str(Path(job.runs_dir).resolve() / "ray_train"),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        final = json.loads((Path(d) / "metrics.json").read_text())
        out = stitch_dir_for(job, spec.key)
        Stitch.load(Path(d) / "stitch").save(out)
    return StitchResult(out, final["run_id"], final["metrics"])


def initial_stitch(s: StitchConfig, a: ActivationReader, b: ActivationReader, meta: dict) -> Stitch:
    """The starting maps: least squares on the first `lstsq_tokens` cached rows (in shard
    order, so every worker computes the same fit), or seeded random maps with zero biases."""
    d_a, d_b = a.manifest.d_model, b.manifest.d_model
    if s.init == "random":
        return Stitch(d_a, d_b, seed=0, meta=meta)
    return lstsq_stitch(_first_rows(a, b, s.lstsq_tokens), d_a, d_b, **meta)


def _first_rows(a: ActivationReader, b: ActivationReader, n: int):
    seen = 0
    for info_a, info_b in aligned_shards(a, b):
        if seen >= n:
            return
        xa = a.vectors(a.read_shard(info_a)).float()[: n - seen]
        xb = b.vectors(b.read_shard(info_b)).float()[: n - seen]
        seen += len(xa)
        yield xa, xb


def _worker(config: dict[str, Any]) -> None:
    job = from_dict(JobConfig, config["job"])
    spec = StitchSpec(**config["spec"])
    s = job.stitch
    assert s is not None
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    reader_a, reader_b = ActivationReader(spec.shards_a), ActivationReader(spec.shards_b)
    meta = {"model_a": job.model.name, "model_b": s.large.name, "site": s.site,
            "layer_a": spec.layer_a, "layer_b": spec.layer_b, "run_key": spec.key}

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_stitch_state(Path(d) / "state")
    stitch = initial_stitch(s, reader_a, reader_b, meta)
    # the closed-form fit is also the baseline the trained stitch is compared with
    baseline = copy.deepcopy(stitch) if rank == 0 and s.init == "lstsq" else None
    stitch = stitch.to(device)

    settings = stitch_settings(s, job.train.log_every_steps)
    mine = aligned_shards(reader_a, reader_b)[rank::world]
    stream = paired_stream(reader_a, reader_b, s.batch_size // world, seed=job.train.seed + 7919 * rank,
                           pairs=mine)
    batches = islice(stream, state.step if state is not None else 0, None)

    tracker = run_id = None
    if rank == 0:
        tracker = Tracker(config["uri"], job.name)
        tags = {"raysae.model_a": job.model.name, "raysae.model_b": s.large.name, **spec.tags}
        run_id = tracker.open_run(spec.key, spec.name, tags, flatten(s, "stitch."), spec.parent_run)
        sample = next(paired_stream(reader_a, reader_b, 256, pairs=mine))
        per_token = flops_per_token(stitch, sample[0].to(device), sample[1].to(device), s.alpha)

    def on_metrics(tokens: int, values: dict[str, float]) -> None:
        if rank == 0:
            tracker.log_metrics(run_id, {f"train/{k}": v for k, v in values.items()}, tokens)

    def on_checkpoint(st) -> None:
        if rank != 0:
            ray.train.report({"tokens_seen": st.tokens_seen}, checkpoint=None)
            return
        values = {"tokens_seen": st.tokens_seen, "flops": per_token * st.tokens_seen}
        if st.tokens_seen >= s.num_tokens:
            values |= _final_metrics(job, spec, stitch, baseline)
        tracker.log_metrics(run_id, values, step=st.tokens_seen)
        with tempfile.TemporaryDirectory() as tmp:
            save_stitch_state(st, Path(tmp) / "state")
            stitch.save(Path(tmp) / "stitch")
            (Path(tmp) / "metrics.json").write_text(json.dumps({"run_id": run_id, "metrics": values}))
            ray.train.report(values, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"tokens_{st.tokens_seen:012d}")
        ray.train.get_all_reported_checkpoints(CheckpointConsistencyMode.COMMITTED)

    train_stitch(stitch, settings, batches, on_metrics=on_metrics, on_checkpoint=on_checkpoint,
                 start_state=state, allreduce_grads=_allreduce_mean if world > 1 else None,
                 world_size=world)
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            tracker.log_artifacts(run_id, stitch.save(Path(tmp) / "stitch"), "stitch")
        tracker.finish(run_id)


def _final_metrics(job: JobConfig, spec: StitchSpec, stitch: Stitch, baseline: Stitch | None) -> dict[str, float]:
    """CE of both models, the stitched models and the round trips, and map quality, for the
    trained stitch and (`lstsq/...`) its closed-form baseline, on held-out tokens."""
    s = job.stitch
    assert s is not None
    device = stitch.P_up.device
    model_a, model_b = load_lm(job.model, device), load_lm(s.large, device)
    tokens = heldout_tokens(job)
    special = special_token_ids(job.model, load_tokenizer(job.model, job.data))
    args = (s.site, spec.layer_a, spec.layer_b, tokens, special)
    values = evaluate_stitch(model_a, model_b, stitch, *args)
    if baseline is not None:
        base = evaluate_stitch(model_a, model_b, baseline.to(device), *args)
        values |= {f"lstsq/{k}": v for k, v in base.items()}
    return values
