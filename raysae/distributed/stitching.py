"""Ray Train: fit a stitch between two models' cached activations, a `Fit` of the engine.

Each worker streams its own slice of the shard pairs (A's and B's shards of the same tokens,
checked row by row), runs the pure-torch loop of `raysae.stitching.stitch.train_stitch` and
averages gradients with one all-reduce per step. Every worker starts from the same maps: the
closed-form least-squares fit on the first `stitch.lstsq_tokens` cached rows (or seeded random
maps). Rank 0 logs to MLflow (step = tokens) its FLOPs at every checkpoint (`flops`, with the
least-squares start's `lstsq/flops`; all dense, so `flops_dense_equiv` is the same) and, at
the last checkpoint, evaluates the stitch and its least-squares baseline in both models on
held-out tokens. Resumption, the MLflow run and checkpoint commits are the engine's
(`raysae.distributed.engine`).
"""

from __future__ import annotations

import copy
from collections.abc import Generator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from raysae.activations import heldout_tokens, special_token_ids
from raysae.checkpoint import TrainState
from raysae.config import JobConfig, StitchConfig, flatten
from raysae.distributed.engine import (
    Fit,
    FitResult,
    FitSpec,
    RunSpec,
    fit_on_ray,
    output_dir,
    worker_seed,
)
from raysae.models import load_lm, load_tokenizer
from raysae.shards import ActivationReader, aligned_shards, paired_stream
from raysae.sources import StreamSupply, batched_tokens
from raysae.stitching.evaluate import evaluate_stitch
from raysae.stitching.stitch import (
    Stitch,
    lstsq_flops,
    lstsq_stitch,
    stitch_flops_per_token,
    stitch_trainer,
)
from raysae.train import Trainer

STITCHES = "stitches"
"""The folder under runs_dir of the final stitches."""


@dataclass(frozen=True, kw_only=True)
class StitchRun(RunSpec):
    """A stitch between one layer of A and one of B."""

    layer_a: int
    layer_b: int


@dataclass(frozen=True, kw_only=True)
class StitchSpec(FitSpec):
    """One stitch fit (a group of one) and its two shard sets."""

    members: tuple[StitchRun]
    shards_a: str
    shards_b: str


def stitch_dir_for(job: JobConfig, key: str) -> Path:
    """Where the final stitch of the fit with this key is saved."""
    return output_dir(job, STITCHES, key)


def train_stitch_on_ray(job: JobConfig, spec: StitchSpec, *, max_failures: int = 2) -> FitResult:
    """Fit one stitch with Ray Train; idempotent for a given spec.key."""
    return fit_on_ray(job, spec, StitchFit, max_failures=max_failures)[spec.members[0].key]


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


class StitchFit(Fit):
    """The up and down maps between one layer of A and one of B."""

    artifact = "stitch"
    output_kind = STITCHES
    spec: StitchSpec

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.s: StitchConfig = self.job.stitch
        self.reader_a = ActivationReader(self.spec.shards_a)
        self.reader_b = ActivationReader(self.spec.shards_b)
        self.mine = aligned_shards(self.reader_a, self.reader_b)[self.rank :: self.world]
        self.baseline: Stitch | None = None  # rank 0: the closed-form start, for comparison
        self._per_token: float | None = None

    @classmethod
    def supply(cls, job: JobConfig, spec: StitchSpec) -> StreamSupply:
        workers, passes = job.train.num_workers, job.train.data_passes
        pairs = aligned_shards(ActivationReader(spec.shards_a), ActivationReader(spec.shards_b))

        def tokens() -> int:
            per_worker = [sum(a.num_tokens for a, _ in pairs[r::workers]) for r in range(workers)]
            return batched_tokens(per_worker, job.stitch.batch_size, passes)

        return StreamSupply(batch=("stitch.batch_size", job.stitch.batch_size),
                            budget=("stitch.num_tokens", job.stitch.num_tokens),
                            data="cached data of both models", tokens=tokens,
                            shards=(spec.shards_a, len(pairs)))

    def build(self, member: StitchRun, state: TrainState | None) -> Stitch:
        meta = {"model_a": self.job.model.name, "model_b": self.s.large.name, "site": self.s.site,
                "layer_a": member.layer_a, "layer_b": member.layer_b, "run_key": member.key}
        stitch = initial_stitch(self.s, self.reader_a, self.reader_b, meta)
        if self.rank == 0 and self.s.init == "lstsq":
            self.baseline = copy.deepcopy(stitch)
        return stitch.to(self.device)

    def batches(self, skip_batches: int) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        stream = paired_stream(self.reader_a, self.reader_b, self.s.batch_size // self.world,
                               seed=worker_seed(self.job.train.seed, self.rank), pairs=self.mine,
                               passes=self.job.train.data_passes)
        yield from islice(stream, skip_batches, None)

    def member_batch(self, member: StitchRun, batch: tuple) -> tuple:
        return batch

    def run_tags(self, member: StitchRun) -> dict[str, str]:
        return {"raysae.model_a": self.job.model.name, "raysae.model_b": self.s.large.name}

    def run_params(self, member: StitchRun) -> dict[str, str]:
        return flatten(self.s, "stitch.")

    def trainer(self, member: StitchRun, model: Stitch, state: TrainState | None, **loop) -> Trainer:
        return stitch_trainer(model, self.s, log_every_steps=self.job.train.log_every_steps,
                              start_state=state, **loop)

    def evaluate(self, due: dict[str, tuple[StitchRun, Stitch, TrainState]]
                 ) -> dict[str, dict[str, float]]:
        out = {}
        for key, (member, stitch, state) in due.items():
            if self._per_token is None:
                a, b = next(paired_stream(self.reader_a, self.reader_b, 256, pairs=self.mine))
                self._per_token = stitch_flops_per_token(stitch, a.to(self.device),
                                                         b.to(self.device), self.s.alpha)
            # the least-squares start is part of the stitch's cost (counted once: every worker
            # computes the same fit only to avoid a broadcast); the stitch's products are all
            # dense, so the dense-equivalent count is the same
            fitted = self.s.init == "lstsq"
            lstsq = lstsq_flops(stitch.meta["lstsq_rows"], stitch.d_a, stitch.d_b) if fitted else 0.0
            total = self._per_token * state.tokens_seen + lstsq
            out[key] = {"flops": total, "flops_dense_equiv": total} | (
                {"lstsq/flops": lstsq} if fitted else {})
            if state.tokens_seen >= self.s.num_tokens:
                out[key] |= self._final_metrics(member, stitch)
        return out

    def _final_metrics(self, member: StitchRun, stitch: Stitch) -> dict[str, float]:
        """CE of both models, the stitched models and the round trips, and map quality, for the
        trained stitch and (`lstsq/...`) its closed-form baseline, on held-out tokens."""
        job, s = self.job, self.s
        model_a, model_b = load_lm(job.model, self.device), load_lm(s.large, self.device)
        special = special_token_ids(job.model, load_tokenizer(job.model, job.data))
        args = (s.site, member.layer_a, member.layer_b, heldout_tokens(job), special)
        values = evaluate_stitch(model_a, model_b, stitch, *args)
        if self.baseline is not None:
            base = evaluate_stitch(model_a, model_b, self.baseline.to(self.device), *args)
            values |= {f"lstsq/{k}": v for k, v in base.items()}
        return values

    def save(self, model: Stitch, folder: Path) -> Path:
        return model.save(folder)
