"""Ray Train: a group of SAEs on one activation stream, data parallel, a `Fit` of the engine.

The members read one model: SAEs of several layers (sites), widths, budgets and starts. Each
worker takes its share of the data (`raysae.sources`: chunk c to worker c mod world) either
from cached shards of every member's site, read together, or by running the LM's truncated
forward on its share of the tokens (`streamed`: one forward per batch for all members, nothing
written). Every member steps on every batch with its own optimiser and schedule until its own
budget, gradients averaged with one all-reduce per member and step, so every worker holds the
same SAEs. At each member's checkpoint rank 0 evaluates it inside the LM on held-out tokens and
logs it to its own MLflow run (step = tokens seen). Resumption, the MLflow runs and checkpoint
commits are the engine's (`raysae.distributed.engine`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from raysae.activations import fingerprint, heldout_tokens, job_windows, special_token_ids
from raysae.checkpoint import TrainState
from raysae.config import (
    JobConfig,
    SAEConfig,
    TrainConfig,
    digest,
    flatten,
    from_dict,
    to_dict,
)
from raysae.costs import pack_saes
from raysae.distributed.engine import (
    Fit,
    FitResult,
    FitSpec,
    RunSpec,
    checkpoint_folders,
    fit_on_ray,
    output_dir,
    worker_seed,
)
from raysae.evaluate import evaluate_saes_kept
from raysae.models import load_lm, load_tokenizer, model_dims, parse_hook_name
from raysae.sae import SAE, SAEMetadata
from raysae.shards import ActivationReader
from raysae.sources import (
    LMActivations,
    StreamSettings,
    StreamSupply,
    batched_tokens,
    batches_from_chunks,
    cached_chunks,
    cached_rows,
    chunk_seqs,
    streamed_chunks,
    window_tokens,
)
from raysae.train import Trainer, dense_sae_flops_per_token, sae_flops_per_token, sae_trainer

SAES = "saes"
"""The folder under runs_dir of the final SAEs."""
B_DEC_SAMPLE = 4096
"""Rows a scratch SAE's b_dec is initialised from."""


@dataclass(frozen=True, kw_only=True)
class SAERun(RunSpec):
    """One SAE of a group: its site, its start, its budget."""

    hook: str
    """The hook it reads, e.g. blocks.3.hook_resid_post."""
    init_from: str | None = None
    """SAE folder to start from (transfer), or None for scratch."""
    num_tokens: int | None = None
    """Its token budget (default: train.num_tokens)."""
    lr: float | None = None
    """Its peak learning rate (default: train.lr)."""
    d_sae: int | None = None
    """Its width (default: the job's sae section)."""


@dataclass(frozen=True, kw_only=True)
class SAEGroupSpec(FitSpec):
    """SAEs trained together from one stream of one model."""

    members: tuple[SAERun, ...]
    source: Literal["cached", "streamed"] = "cached"
    shards: dict[str, str] | None = None
    """Hook -> shard directory of every member's site (cached)."""


def group_key(members: list[SAERun] | tuple[SAERun, ...]) -> str:
    """A group's identity: its members' keys (a group of one is named after its member)."""
    if len(members) == 1:
        return members[0].key
    return f"group:{len(members)}:{digest(sorted(m.key for m in members))}"


def training_key(job: JobConfig, hook: str, init_from: str | None) -> str:
    """A stable identity for a training: its site, its start, and every setting that changes it."""
    setting = {
        "cache": fingerprint(job),
        "sae": to_dict(job.sae),
        "train": to_dict(job.train),
        "init_from": init_from,
    }
    return f"{hook}|{'scratch' if init_from is None else 'transfer'}|{digest(setting)}"


def zero_ablations_path(job: JobConfig) -> Path:
    """Where the model's zero-ablated CE and KL per site on the job's held-out tokens are kept,
    computed once for every group and phase that evaluates SAEs of the job's model."""
    key = digest({"model": to_dict(job.model), "data": to_dict(job.data),
                  "eval_tokens": job.train.eval_tokens})
    return Path(job.runs_dir) / "eval" / f"zero_ablations_{key}.json"


def sae_dir_for(job: JobConfig, key: str) -> Path:
    """Where the final SAE of the training with this key is saved."""
    return output_dir(job, SAES, key)


def checkpoint_saes(job: JobConfig, key: str) -> list[tuple[int, Path]]:
    """(tokens seen, SAE folder) of every checkpoint of the training with this key, in order."""
    return checkpoint_folders(job, key, SAEGroupFit.artifact)


def train_on_ray(job: JobConfig, spec: SAEGroupSpec, *, max_failures: int = 2
                 ) -> dict[str, FitResult]:
    """Train a group of SAEs with Ray Train; idempotent for a given spec (finished members are
    reused). Returns each member's result by key."""
    return fit_on_ray(job, spec, SAEGroupFit, max_failures=max_failures)


def sae_groups(job: JobConfig, members: list[SAERun], source: str,
               shards: dict[str, str] | None) -> list[SAEGroupSpec]:
    """The members packed into groups that fit a worker (`train.worker_memory_gb`, the stream
    included) and `train.max_group_saes`, in order (`costs.pack_saes`)."""
    saes = [(member_config(job, m)[0], m.hook) for m in members]
    out = []
    for idx in pack_saes(job, job.model, saes, source == "streamed").groups:
        group = tuple(members[i] for i in idx)
        out.append(SAEGroupSpec(key=group_key(group), members=group, source=source,
                                shards=shards if source == "cached" else None))
    return out


def members_of(spec: SAEGroupSpec) -> list[str]:
    return [m.key for m in spec.members]


def regroup(spec: SAEGroupSpec, parts: list[list[int]]) -> dict[str, SAEGroupSpec]:
    """The group's members (by index) in `parts`, each a group of its own (a failed group's
    retry: `engine.run_groups`), keyed by `group_key`."""
    out = {}
    for idx in parts:
        members = tuple(spec.members[i] for i in idx)
        out[group_key(members)] = dataclasses.replace(spec, key=group_key(members), members=members)
    return out


def run_sae_group(key: str, job: dict, groups: dict[str, SAEGroupSpec],
                  max_failures: int) -> dict[str, FitResult]:
    """A Tune trial's work: train the group with this key (see `engine.tune_phase`); a group
    whose members were all settled before the phase (a restored trial) trains nothing."""
    spec = groups.get(key)
    if spec is None or not spec.members:
        return {}
    return train_on_ray(from_dict(JobConfig, job), spec, max_failures=max_failures)


def member_config(job: JobConfig, m: SAERun) -> tuple[SAEConfig, TrainConfig]:
    """The SAE and training settings of one member: the job's, with its width, budget and lr."""
    return job.sae_settings(m.d_sae, m.num_tokens, m.lr)


def stream_tokens(job: JobConfig, spec: SAEGroupSpec, world: int) -> int:
    """Tokens the group's stream gives, over every worker and pass, counted from the data
    alone: cached rows from the manifests; streamed, the windows' tokens (an upper bound: the
    special tokens among them are dropped when read)."""
    if spec.source == "cached":
        readers = {h: ActivationReader(d) for h, d in spec.shards.items()}
        per_worker = [cached_rows(readers, r, world) for r in range(world)]
    else:
        per_worker = window_tokens(job, world)
    return batched_tokens(per_worker, job.train.batch_size, job.train.data_passes)


class SAEGroupFit(Fit):
    """SAEs on one model's activations, from one stream."""

    artifact = "sae"
    output_kind = SAES
    spec: SAEGroupSpec

    @classmethod
    def supply(cls, job: JobConfig, spec: SAEGroupSpec) -> StreamSupply:
        world = job.train.num_workers
        shards = None
        if spec.source == "cached":
            readers = {h: ActivationReader(d) for h, d in spec.shards.items()}  # verified here
            shards = (next(iter(spec.shards.values())),
                      len(next(iter(readers.values())).manifest.shards))
        return StreamSupply(
            batch=("train.batch_size", job.train.batch_size),
            budget=("train.num_tokens", max(member_config(job, m)[1].num_tokens
                                            for m in spec.members)),
            data=f"{spec.source} data", tokens=lambda: stream_tokens(job, spec, world),
            shards=shards,
        )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        job, spec = self.job, self.spec
        self.hooks = sorted({m.hook for m in spec.members})
        self.d_in = model_dims(job.model)[1]
        self.lm: torch.nn.Module | None = None
        if spec.source == "cached":
            self.readers = {h: ActivationReader(spec.shards[h]) for h in self.hooks}
        self._eval: tuple | None = None  # rank 0: see evaluate
        self._b_dec_sample: dict[str, torch.Tensor] | None = None

    # the stream ----------------------------------------------------------------------------

    def _chunks(self, rank: int):
        job = self.job
        if self.spec.source == "cached":
            return cached_chunks(self.readers, rank, self.world, job.train.shuffle)
        lm = LMActivations(self.model_lm(), [parse_hook_name(h) for h in self.hooks],
                           self.special_ids(), job.cache.batch_size, self.device)
        return streamed_chunks(lm, lambda: job_windows(job, job.data.num_tokens),
                               chunk_seqs(job), rank, self.world)

    def batches(self, skip_batches: int) -> Generator[dict[str, torch.Tensor], None, None]:
        tc = self.job.train
        settings = StreamSettings(
            batch_size=tc.batch_size // self.world, rank=self.rank, world=self.world,
            seed=worker_seed(tc.seed, self.rank), shuffle=tc.shuffle, passes=tc.data_passes,
            skip_batches=skip_batches,
        )
        return batches_from_chunks(self._chunks(self.rank), settings)

    def member_batch(self, member: SAERun, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch[member.hook]

    def model_lm(self) -> torch.nn.Module:
        if self.lm is None:
            self.lm = load_lm(self.job.model, self.device)
        return self.lm

    def special_ids(self) -> list[int]:
        job = self.job
        return special_token_ids(job.model, load_tokenizer(job.model, job.data))

    def b_dec_sample(self, hook: str) -> torch.Tensor:
        """The first B_DEC_SAMPLE rows of rank 0's first pass (chunks in stream order, rows in
        corpus order): the same on every worker and in both sources."""
        if self._b_dec_sample is None:
            parts: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
            rows = 0
            gen = torch.Generator().manual_seed(worker_seed(self.job.train.seed, 0))
            for chunk in self._chunks(0)(0, gen):
                for h, x in chunk.load().items():
                    parts[h].append(x)
                rows += chunk.rows
                if rows >= B_DEC_SAMPLE:
                    break
            self._b_dec_sample = {h: torch.cat(xs)[:B_DEC_SAMPLE] for h, xs in parts.items()}
        return self._b_dec_sample[hook]

    # the members ---------------------------------------------------------------------------

    def build(self, member: SAERun, state: TrainState | None) -> SAE:
        job = self.job
        sae_cfg, train = member_config(job, member)
        metadata = SAEMetadata(
            model_name=job.model.name,
            hook_name=member.hook,
            context_size=job.data.context_length,
            prepend_bos=job.data.prepend_bos,
            extras={"run_key": member.key, "init_from": member.init_from},
        )
        if member.init_from:
            return SAE.init_from(member.init_from, sae_cfg, self.d_in, metadata=metadata,
                                 device=self.device)
        sae = SAE(sae_cfg, self.d_in, metadata=metadata, seed=train.seed, device=self.device)
        if state is None:
            sae.init_b_dec(self.b_dec_sample(member.hook).to(self.device))
        return sae

    def trainer(self, member: SAERun, model: SAE, state: TrainState | None, **loop) -> Trainer:
        return sae_trainer(model, member_config(self.job, member)[1], start_state=state, **loop)

    def run_tags(self, member: SAERun) -> dict[str, str]:
        site, layer = parse_hook_name(member.hook)
        return {
            "raysae.model": self.job.model.name,
            "raysae.site": site,
            "raysae.layer": str(layer),
            "raysae.hook": member.hook,
            "raysae.architecture": self.job.sae.architecture,
            "raysae.init": member.init_from or "scratch",
            "raysae.source": self.spec.source,
        }

    def run_params(self, member: SAERun) -> dict[str, str]:
        sae, train = member_config(self.job, member)
        return flatten(dataclasses.replace(self.job, sae=sae, train=train))

    def evaluate(self, due: dict[str, tuple[SAERun, SAE, TrainState]]) -> dict[str, dict[str, float]]:
        if self._eval is None:  # held-out tokens, FLOPs per member
            self._eval = (heldout_tokens(self.job), self.special_ids(), {})
        tokens, special, flops = self._eval
        # an SAE read at its own site twice (a readout on the diagonal) is evaluated once
        first = {}
        for key, (member, sae, _) in due.items():
            first.setdefault((id(sae), member.hook), key)
        saes = {key: (due[key][1], *parse_hook_name(hook)) for (_, hook), key in first.items()}
        results = evaluate_saes_kept(zero_ablations_path(self.job), self.model_lm(), saes,
                                     tokens, special)
        out = {}
        for key, (member, sae, state) in due.items():
            if id(sae) not in flops:  # FLOPs depend on shapes only (a readout shares its SAE)
                sample = torch.randn(1024, self.d_in, device=self.device)
                flops[id(sae)] = sae_flops_per_token(sae, sample, member_config(self.job, member)[1])
            result = results[first[(id(sae), member.hook)]]
            out[key] = {f"eval/{k}": v for k, v in result.as_dict().items()}
            out[key]["flops"] = flops[id(sae)] * state.tokens_seen
            dense = dense_sae_flops_per_token(sae.d_in, sae.d_sae)  # the stitching paper's count
            out[key]["flops_dense_equiv"] = dense * state.tokens_seen
        return out

    def save(self, model: SAE, folder: Path) -> Path:
        return model.save(folder)
