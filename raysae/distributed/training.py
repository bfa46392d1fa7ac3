"""Ray Train: data-parallel SAE training on activation shards, a `Fit` of the engine.

Each worker streams a disjoint slice of the shards (shard i goes to worker i mod world size),
runs the pure-torch loop of `raysae.train`, and averages gradients with one all-reduce per step,
so every worker holds the same SAE. At every checkpoint rank 0 evaluates the SAE inside the LM
on held-out tokens and logs it to MLflow (step = tokens seen). Resumption, the MLflow run and
checkpoint commits are the engine's (`raysae.distributed.engine`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from raysae.activations import fingerprint, heldout_tokens, special_token_ids
from raysae.checkpoint import TrainState
from raysae.config import JobConfig, digest, flatten, to_dict
from raysae.distributed.engine import (
    Fit,
    FitResult,
    FitSpec,
    WorkerHooks,
    checkpoint_folders,
    fit_on_ray,
    output_dir,
    worker_seed,
)
from raysae.evaluate import evaluate_sae
from raysae.models import load_lm, load_tokenizer, parse_hook_name
from raysae.sae import SAE, SAEMetadata
from raysae.shards import ActivationReader
from raysae.train import sae_flops_per_token, train_sae

SAES = "saes"
"""The folder under runs_dir of the final SAEs."""


@dataclass(frozen=True, kw_only=True)
class TrainSpec(FitSpec):
    """One SAE training: its identity, its data, and where it starts from."""

    shards_dir: str
    """Activation shard directory of the site the SAE is trained on."""
    init_from: str | None = None
    """SAE folder to start from (transfer), or None for scratch."""


def training_key(job: JobConfig, hook: str, init_from: str | None) -> str:
    """A stable identity for a training: its site, its start, and every setting that changes it."""
    setting = {
        "cache": fingerprint(job),
        "sae": to_dict(job.sae),
        "train": to_dict(job.train),
        "init_from": init_from,
    }
    return f"{hook}|{'scratch' if init_from is None else 'transfer'}|{digest(setting)}"


def sae_dir_for(job: JobConfig, key: str) -> Path:
    """Where the final SAE of the training with this key is saved."""
    return output_dir(job, SAES, key)


def checkpoint_saes(job: JobConfig, key: str) -> list[tuple[int, Path]]:
    """(tokens seen, SAE folder) of every checkpoint of the training with this key, in order."""
    return checkpoint_folders(job, key, SAEFit.artifact)


def train_on_ray(job: JobConfig, spec: TrainSpec, *, max_failures: int = 2,
                 hooks: WorkerHooks | None = None) -> FitResult:
    """Train one SAE with Ray Train; idempotent for a given spec.key (a finished run is reused)."""
    return fit_on_ray(job, spec, SAEFit, max_failures=max_failures, hooks=hooks)


class SAEFit(Fit):
    """One SAE on one site's shards."""

    artifact = "sae"
    output_kind = SAES
    spec: TrainSpec

    @classmethod
    def check(cls, job: JobConfig, spec: TrainSpec) -> None:
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

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reader = ActivationReader(self.spec.shards_dir)
        self.hook = self.reader.manifest.hook_name
        self.site, self.layer = parse_hook_name(self.hook)
        self.mine = self.reader.manifest.shards[self.rank :: self.world]
        self._eval: tuple | None = None  # rank 0: the LM, held-out tokens, FLOPs per token

    @property
    def files(self) -> list[str]:
        return [s.file for s in self.mine]

    def build(self, state: TrainState | None) -> SAE:
        job, spec = self.job, self.spec
        d_in = self.reader.manifest.d_model
        metadata = SAEMetadata(
            model_name=job.model.name,
            hook_name=self.hook,
            context_size=job.data.context_length,
            prepend_bos=job.data.prepend_bos,
            extras={"run_key": spec.key, "init_from": spec.init_from},
        )
        if spec.init_from:
            return SAE.init_from(spec.init_from, job.sae, d_in, metadata=metadata, device=self.device)
        sae = SAE(job.sae, d_in, metadata=metadata, seed=job.train.seed, device=self.device)
        if state is None:  # the same sample on every worker: identical b_dec everywhere
            sample = next(self.reader.iter_batches(4096, seed=job.train.seed))
            sae.init_b_dec(sample.to(self.device))
        return sae

    def batches(self) -> Iterator[torch.Tensor]:
        per_worker = self.job.train.batch_size // self.world
        seed = worker_seed(self.job.train.seed, self.rank)
        return self.reader.stream(per_worker, seed=seed, shards=self.mine)

    def run_tags(self) -> dict[str, str]:
        return {
            "raysae.model": self.job.model.name,
            "raysae.site": self.site,
            "raysae.layer": str(self.layer),
            "raysae.hook": self.hook,
            "raysae.architecture": self.job.sae.architecture,
            "raysae.init": self.spec.init_from or "scratch",
        }

    def run_params(self) -> dict[str, str]:
        return flatten(self.job)

    def train(self, model: SAE, batches: Iterator[torch.Tensor], state: TrainState | None,
              **loop) -> TrainState:
        return train_sae(model, self.job.train, batches, start_state=state, **loop)

    def evaluate(self, model: SAE, state: TrainState) -> dict[str, float]:
        if self._eval is None:
            job = self.job
            lm = load_lm(job.model, self.device)
            special = special_token_ids(job.model, load_tokenizer(job.model, job.data))
            sample = next(self.reader.iter_batches(1024, shuffle=False)).to(self.device)
            self._eval = (lm, heldout_tokens(job), special, sae_flops_per_token(model, sample, job.train))
        lm, tokens, special, per_token = self._eval
        res = evaluate_sae(lm, model, self.site, self.layer, tokens, special)
        values = {f"eval/{k}": v for k, v in res.as_dict().items()}
        values["flops"] = per_token * state.tokens_seen
        return values

    def save(self, model: SAE, folder: Path) -> Path:
        return model.save(folder)
