"""Typed, validated configs: the ground floor every other module reads.

Configs are frozen dataclasses with no side effects. They load from YAML (or dicts) with strict
checking: an unknown field, a wrong type, a float that is not finite or a value outside its
allowed set raises `ConfigError` naming the field path, the value and what is allowed. Checks that
need the model or the file system (a layer index beyond its depth, a local path that is missing)
live in `raysae.cli.check_job`, which runs before any Ray work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from raysae.architectures import ARCHITECTURES, ArchitectureSpec, allowed, spec_of

Site = Literal["resid_pre", "resid_post"]
StorageDtype = Literal["float32", "float16", "bfloat16"]
ModelDtype = Literal["float32", "float16", "bfloat16"]
Source = Literal["auto", "cached", "streamed"]


class ConfigError(ValueError):
    """A config value is wrong; the message names the field, the value and what is allowed."""


# ---------------------------------------------------------------------------------------------
# Generic strict loading


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`, converting dicts into nested dataclasses."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: got {value!r}, expected {_type_name(tp)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: got {value!r}, expected a list")
        (item_tp, *_) = get_args(tp) or (Any,)
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {value!r}, expected a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {value!r}, expected a mapping of {tp.__name__} fields")
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: got {value!r}, expected a finite number")
    if tp is int and isinstance(value, float) and value.is_integer() and abs(value) >= 1e3:
        return int(value)  # YAML reads 1e6 as a float; accept it where a token count is meant
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{path}: got {value!r} ({type(value).__name__}), expected {tp.__name__}")
    return value


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from a dict, rejecting unknown fields and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown field {where}{unknown[0]!r} in {cls.__name__}; allowed fields: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required field
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


DIGEST_CHARS = 16


def digest(value: Any) -> str:
    """The one identity rule of raysae: the first 16 hex digits of the SHA-256 of `value` as
    JSON with sorted keys (dataclasses through `to_dict` first). Cache fingerprints, trial and
    training keys, sweep digests and the toy pair's folder names all use it, so equal settings
    always give equal names and any changed setting a new one."""
    blob = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:DIGEST_CHARS]


def sweep_digest(job: JobConfig) -> str:
    """A sweep's identity (its parent MLflow run and its Tune experiments): every setting of
    the job but where it lives (`runs_dir`, `tracking_uri`) and the feature evaluations
    (`features`, which re-evaluate finished SAEs under their own digest without retraining them)."""
    where = ("runs_dir", "tracking_uri", "features")
    return digest({k: v for k, v in to_dict(job).items() if k not in where})


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain dicts and lists (for YAML and manifests)."""
    out = dataclasses.asdict(cfg)

    def fix(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [fix(v) for v in x]
        return x

    return fix(out)


def flatten(cfg: Any, prefix: str = "") -> dict[str, str]:
    """`a.b.c -> str(value)` pairs, the form MLflow params take."""
    flat: dict[str, str] = {}
    for k, v in (to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "from_config":
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = str(v)
    return flat


def _fail(path: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{path}: got {value!r}, expected {expected}")


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
NAME_MAX = 255 - len("-0123456789abcdef-stitch-transfer")
"""The longest job name: its Tune folders (`<name>-<digest>-<phase>`, the longest phase a stitch
sweep's) must fit a file system's 255-byte path component."""
_PATH_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".txt")


def local_path(name: str) -> Path | None:
    """`name` as a path (`~` expanded) when it can only be one: it starts with /, ./, ../ or ~,
    has more than one '/', or ends in a data-file suffix. None for anything that may be a hub
    name ('org/name' or 'name'), which only a hub could tell."""
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name.endswith(_PATH_SUFFIXES):
        return Path(name).expanduser()
    return None


# ---------------------------------------------------------------------------------------------
# The configs


@dataclass(frozen=True)
class ModelConfig:
    """Which language model to load."""

    name: str
    """Hub name or local path of a Hugging Face causal LM; a label when `from_config` is set."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); None for the default branch or a local path."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off unless a config turns it on."""
    dtype: ModelDtype = "float32"
    """Dtype the model's weights are loaded in."""
    from_config: dict[str, Any] | None = None
    """Build a randomly initialised model from this HF config dict (tests, benchmarks)."""
    init_seed: int = 0
    """Seed for the weights of a model built from `from_config`."""


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from and how many."""

    source: str
    """A `datasets` hub name, or a local .parquet/.arrow/.jsonl file or directory of them."""
    context_length: int
    """Tokens per sequence fed to the model."""
    num_tokens: int
    """Token budget: sequences are taken until their total reaches this (rounded up to a sequence)."""
    column: str = "input_ids"
    """Column holding token ids (lists of ints) or text (strings, tokenized with `tokenizer`)."""
    split: str = "train"
    """Dataset split."""
    tokenizer: str | None = None
    """Tokenizer name/path; defaults to the model's. Needed for text columns and special tokens."""
    prepend_bos: bool = False
    """Put the BOS token at the start of every sequence (text sources only)."""

    def __post_init__(self) -> None:
        if self.context_length < 1:
            _fail("data.context_length", self.context_length, "a positive integer")
        if self.num_tokens < self.context_length:
            _fail("data.num_tokens", self.num_tokens, f">= context_length ({self.context_length})")


@dataclass(frozen=True)
class CacheConfig:
    """The activation-caching stage: which sites to record and how to store them."""

    sites: tuple[Site, ...] = ("resid_post",)
    """Hook sites recorded at every layer in `layers`."""
    layers: tuple[int, ...] = (0,)
    """Block indices to record (0-based); checked against the model before any work starts."""
    dtype: StorageDtype = "float32"
    """Storage dtype of the vectors; bfloat16 is stored as its raw 16 bits (uint16)."""
    batch_size: int = 8
    """Sequences per forward pass in one LM actor."""
    shard_tokens: int = 65536
    """Approximate tokens per shard file (a shard holds whole forward batches)."""
    num_actors: int = 1
    """LM actors in the Ray Data pool (one per GPU when use_gpu)."""
    actor_cpus: float = 0.5
    """CPUs reserved per LM actor; below 1 so Ray Data's read tasks never starve on small nodes."""
    use_gpu: bool = False
    """Place each LM actor on a GPU."""
    exclude_special: bool = True
    """Drop BOS/EOS/PAD positions from the shards."""
    out_dir: str = "activations"
    """Root of the activation cache, relative to the job's runs_dir unless absolute."""

    def __post_init__(self) -> None:
        if not self.sites:
            _fail("cache.sites", self.sites, "at least one site")
        if not self.layers or any(i < 0 for i in self.layers):
            _fail("cache.layers", self.layers, "a non-empty list of non-negative block indices")
        if len(set(self.layers)) != len(self.layers):
            _fail("cache.layers", self.layers, "no repeated layers")
        for name in ("batch_size", "shard_tokens", "num_actors"):
            if getattr(self, name) < 1:
                _fail(f"cache.{name}", getattr(self, name), "a positive integer")
        if self.actor_cpus <= 0:
            _fail("cache.actor_cpus", self.actor_cpus, "a positive number")


Architecture = str
"""A name registered in `raysae.architectures.ARCHITECTURES` (checked where a config is built)."""
ComputePlanDirection = Literal["forward", "backward"]
ComputePlanSource = Literal["checkpoint", "run"]
BDecInit = Literal["mean", "geometric_median", "zeros"]


@dataclass(frozen=True)
class SAEConfig:
    """The sparse autoencoder: architecture, width and sparsity."""

    architecture: Architecture = "relu"
    """relu (ReLU + decoder-norm-weighted L1), topk (k largest pre-activations per token),
    jumprelu, batchtopk (the k·B largest over a batch of B; one threshold at inference) or
    matryoshka_batchtopk (batchtopk whose nested prefixes each reconstruct the input)."""
    expansion_factor: int = 8
    """d_sae = expansion_factor * d_in (ignored when d_sae is set)."""
    d_sae: int | None = None
    """Explicit dictionary width."""
    k: int = 64
    """Active latents per token: exactly (topk), on average over each batch (batchtopk,
    matryoshka_batchtopk)."""
    matryoshka_widths: tuple[int, ...] = ()
    """The nested prefix widths of matryoshka_batchtopk, strictly increasing, the last = d_sae:
    the first w latents alone reconstruct the input, for each w (ignored by the others)."""
    aux_coefficient: float = 0.0
    """Weight of the AuxK loss of topk, batchtopk and matryoshka_batchtopk (Gao et al. 2024 use
    1/32; 0 turns it off): the d_in/2 largest dead latents (not fired in
    train.dead_window_tokens) reconstruct the residual error. Ignored by relu and jumprelu."""
    l1_coefficient: float = 5.0
    """Sparsity coefficient: L1 weight for relu, L0 weight for jumprelu. The relu loss is
    SAELens's (`raysae.sae`): ||x - x̂||² summed over d_in plus λ Σ_i f_i ||W_dec_i||, both
    averaged over tokens, no activation scaling, so the layer-transfer paper's λ = 1.0 (Table 2;
    its SAELens code: unit-norm decoder rows, λ Σ_i f_i) carries over unchanged."""
    jumprelu_threshold: float = 0.001
    """Initial per-feature threshold (jumprelu)."""
    jumprelu_bandwidth: float = 0.001
    """Width of the straight-through window of the threshold gradient (jumprelu)."""
    b_dec_init: BDecInit = "geometric_median"
    """How a scratch SAE's b_dec is set from a data sample."""

    def __post_init__(self) -> None:
        if self.expansion_factor < 1:
            _fail("sae.expansion_factor", self.expansion_factor, "a positive integer")
        if self.d_sae is not None and self.d_sae < 1:
            _fail("sae.d_sae", self.d_sae, "a positive integer or null")
        if self.k < 1:
            _fail("sae.k", self.k, "a positive integer")
        if self.architecture not in ARCHITECTURES:
            _fail("sae.architecture", self.architecture, allowed())
        for problem in self.width_problems(self.d_sae, f"sae.d_sae ({self.d_sae})"):
            _fail(*problem)
        if self.aux_coefficient < 0:
            _fail("sae.aux_coefficient", self.aux_coefficient, "a non-negative number")
        if self.l1_coefficient < 0:
            _fail("sae.l1_coefficient", self.l1_coefficient, "a non-negative number")
        if self.jumprelu_threshold <= 0:
            _fail("sae.jumprelu_threshold", self.jumprelu_threshold, "a positive number")
        if self.jumprelu_bandwidth <= 0:
            _fail("sae.jumprelu_bandwidth", self.jumprelu_bandwidth, "a positive number")

    def width(self, d_in: int) -> int:
        """The dictionary width for inputs of width `d_in`."""
        return self.d_sae if self.d_sae is not None else self.expansion_factor * d_in

    @property
    def spec(self) -> ArchitectureSpec:
        """The architecture's registry entry (`raysae.architectures`)."""
        return spec_of(self.architecture)

    @property
    def uses_k(self) -> bool:
        """Whether `k` sets the sparsity (topk, batchtopk, matryoshka_batchtopk)."""
        return self.spec.uses_k

    def width_problems(self, d_sae: int | None, width: str) -> list[tuple[str, Any, str]]:
        """The architecture's checks at dictionary width `d_sae` (None: not known yet), as
        (field, value, expected); messages call the width `width`. The one place k <= d_sae
        and the Matryoshka widths are checked."""
        return list(self.spec.problems(self, d_sae, width))

    def check_width(self, d_in: int, why: str = "") -> None:
        """Raise ConfigError if the architecture's checks fail at the width for inputs of width
        `d_in` (k above it, a last Matryoshka width that is not it); `why` says where the width
        comes from (appended to it in the message)."""
        d_sae = self.width(d_in)
        for problem in self.width_problems(d_sae, f"d_sae ({d_sae}{why})"):
            _fail(*problem)

    def prefix_widths(self, d_in: int) -> tuple[int, ...]:
        """The widths whose prefixes are trained to reconstruct: the Matryoshka widths, or the
        whole dictionary. Raises ConfigError if the width fails the architecture's checks."""
        self.check_width(d_in)
        return self.spec.prefix_widths(self, self.width(d_in))


@dataclass(frozen=True)
class TrainConfig:
    """The SAE training loop: token budget, optimiser, schedule, checkpoints."""

    num_tokens: int = 1_000_000
    """Token budget; training stops at exactly this many tokens."""
    batch_size: int = 4096
    """Activation vectors per optimiser step (global, across workers)."""
    lr: float = 3e-5
    """Peak learning rate (paper: 3e-5 scratch, 1e-5 fine-tune)."""
    adam_betas: tuple[float, ...] = (0.0, 0.999)
    """Adam (beta1, beta2)."""
    lr_warmup_frac: float = 0.05
    """Fraction of steps of linear lr warm-up (the layer-transfer paper has none: Table 2's 5%
    warm-up is the L1's, `l1_warmup_frac`)."""
    lr_decay_frac: float = 0.2
    """Fraction of final steps of linear lr decay to zero."""
    l1_warmup_frac: float = 0.05
    """Fraction of steps over which the sparsity coefficient ramps up from 0."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    checkpoint_every_tokens: int = 250_000
    """Tokens between checkpoints (paper: 100M of 500M)."""
    dead_window_tokens: int = 1_000_000
    """A latent that has not fired in this many tokens counts as dead."""
    eval_tokens: int = 16384
    """Held-out tokens used for the metrics at each checkpoint."""
    seed: int = 0
    """Seed for initialisation and data order."""
    num_workers: int = 1
    """Ray Train workers (data parallel)."""
    use_gpu: bool = False
    """One GPU per worker."""
    autocast_bf16: bool = False
    """bf16 autocast for the SAE forward (GPU)."""
    log_every_steps: int = 100
    """Optimiser steps between metric reports (the only points where the loop syncs the host)."""
    source: Source = "auto"
    """Where activations come from: `cached` Arrow shards (one LM pass, read back by every
    training), `streamed` (each worker runs the LM's truncated forward on its share of the
    tokens, nothing written), or `auto` (the plan's choice: see `raysae plan`)."""
    data_passes: int = 1
    """Passes a training may make over its data (cached rows or streamed tokens); a budget that
    needs more is refused before any work, naming both numbers."""
    shuffle: bool = True
    """Shuffle rows across a buffer of 4 chunks (and cached chunks' order); off, both sources
    give the rows in corpus order."""
    max_group_saes: int = 0
    """Most SAEs trained together from one activation stream (0: as many as `worker_memory_gb`
    holds)."""
    worker_memory_gb: float = 16.0
    """Memory one worker gives its group (GPU memory with use_gpu, else RAM): groups are split
    to fit it (`raysae plan` shows how)."""

    def __post_init__(self) -> None:
        if self.data_passes < 1:
            _fail("train.data_passes", self.data_passes, "a positive integer")
        if self.max_group_saes < 0:
            _fail("train.max_group_saes", self.max_group_saes, "0 (no limit) or a positive integer")
        if not self.worker_memory_gb > 0:
            _fail("train.worker_memory_gb", self.worker_memory_gb, "a positive number of GiB")
        if self.num_tokens < self.batch_size:
            _fail("train.num_tokens", self.num_tokens, f">= batch_size ({self.batch_size})")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            _fail("train.adam_betas", self.adam_betas, "two numbers in [0, 1)")
        for name in ("lr_warmup_frac", "lr_decay_frac", "l1_warmup_frac"):
            if not 0 <= getattr(self, name) <= 1:
                _fail(f"train.{name}", getattr(self, name), "a fraction in [0, 1]")
        if self.lr_warmup_frac + self.lr_decay_frac > 1:
            _fail("train.lr_decay_frac", self.lr_decay_frac, "lr_warmup_frac + lr_decay_frac <= 1")
        for name in (
            "batch_size",
            "checkpoint_every_tokens",
            "dead_window_tokens",
            "num_workers",
            "eval_tokens",
            "log_every_steps",
        ):
            if getattr(self, name) < 1:
                _fail(f"train.{name}", getattr(self, name), "a positive integer")
        if self.lr <= 0:
            _fail("train.lr", self.lr, "a positive number")
        if self.grad_clip < 0:
            _fail("train.grad_clip", self.grad_clip, "a non-negative number (0 disables)")


@dataclass(frozen=True)
class JobConfig:
    """One job: a model, its data, and the stages to run on it."""

    name: str
    """Experiment name (MLflow experiment, output folder): letters, digits, ., _ and -."""
    model: ModelConfig
    """The language model."""
    data: DataConfig
    """The token source."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """Activation caching."""
    sae: SAEConfig = field(default_factory=SAEConfig)
    """The SAE architecture and width."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """SAE training."""
    runs_dir: str = "runs"
    """Root of everything the job writes (a shared filesystem on a multi-node cluster)."""
    tracking_uri: str | None = None
    """Where the MLflow runs go (an `mlflow server` for a cluster). None: the driver's
    MLFLOW_TRACKING_URI, else sqlite:///<runs_dir>/mlflow.db. The driver fixes it when it loads
    the job, and every task and worker logs there (their own environments are never read)."""
    sweep: SweepConfig | None = None
    """The layer-wise transfer grid (`raysae.transfer.grid`); None for a job without a sweep."""
    stitch: StitchConfig | None = None
    """The small-to-large stitch grid (`raysae.stitching.grid`); `model` is the small model A."""
    features: FeaturesConfig | None = None
    """Feature-quality evaluations of every SAE the sweep trains (circuits, DLA, dashboards)."""

    def __post_init__(self) -> None:
        # The name is a folder and Tune experiment name: nothing that could leave runs_dir.
        if not _SAFE_NAME.fullmatch(self.name):
            _fail("name", self.name, "letters, digits, '.', '_' and '-', not starting with '.' or '-'")
        if len(self.name) > NAME_MAX:
            _fail("name", f"{len(self.name)} characters",
                  f"at most {NAME_MAX} (its Tune folders add up to {255 - NAME_MAX} to a "
                  "255-byte path component)")

    def sae_settings(self, d_sae: int | None = None, num_tokens: int | None = None,
                     lr: float | None = None) -> tuple[SAEConfig, TrainConfig]:
        """One SAE's settings: the job's sae and train sections with its width, budget and
        learning rate (each left out: the job's)."""
        sae = self.sae if d_sae is None else dataclasses.replace(self.sae, d_sae=d_sae)
        train = dataclasses.replace(self.train, num_tokens=num_tokens or self.train.num_tokens,
                                    lr=lr or self.train.lr)
        return sae, train


@dataclass(frozen=True, kw_only=True)
class StopChecks:
    """The stop-check interval, the one field both studies' stop rules share (the transfer's
    `sweep.stop_at`, the stitch's `stop_at_thresholds`): `raysae.stopping.StopRule.every_tokens`.
    Keyword-only, so a config with required fields can take it in."""

    check_every_tokens: int | None = None
    """Tokens between the stop checks (an evaluation and a stop decision in the group's shared
    pass, no resume point) of the SAEs a stop rule applies to, beside their checkpoints; default:
    at their checkpoints only (`train.checkpoint_every_tokens`)."""

    def _check_stop_checks(self, path: str) -> None:
        """ConfigError naming `<path>.check_every_tokens` unless it is a positive count."""
        if self.check_every_tokens is not None and self.check_every_tokens < 1:
            _fail(f"{path}.check_every_tokens", self.check_every_tokens, "a positive count")


@dataclass(frozen=True)
class StopConfig(StopChecks):
    """When a transfer SAE stops before its budget (`raysae.stopping`): on a quality target, a
    plateau, or either. A stopped SAE leaves its group (the others go on), its run records the
    tokens it used and why; one that never gets there runs its budget and says so. Its stop
    checks: `check_every_tokens` (`StopChecks`)."""

    normalized_ces: float | None = None
    """Stop at this normalized CES (against the zero-shot SAE and the scratch SAE of the layer)."""
    within_scratch: float | None = None
    """Stop when `within_metric` is within this margin of the scratch SAE of the layer."""
    within_metric: Literal["ces", "explained_variance"] = "ces"
    """The metric `within_scratch` compares (higher is better for both)."""
    plateau_gain: float | None = None
    """Stop when CES gained less than this over the last `plateau_checkpoints` checkpoints."""
    plateau_checkpoints: int = 3
    """Checkpoints a plateau is measured over."""

    def __post_init__(self) -> None:
        targets = (self.normalized_ces, self.within_scratch)
        if all(t is None for t in targets) and self.plateau_gain is None:
            _fail("sweep.stop_at", "no target", "normalized_ces, within_scratch or plateau_gain")
        if None not in targets:
            _fail("sweep.stop_at", targets, "one target: normalized_ces or within_scratch")
        if self.normalized_ces is not None and not 0 < self.normalized_ces <= 1.5:
            _fail("sweep.stop_at.normalized_ces", self.normalized_ces, "a target in (0, 1.5]")
        if self.within_scratch is not None and self.within_scratch < 0:
            _fail("sweep.stop_at.within_scratch", self.within_scratch, "a margin >= 0")
        if self.plateau_checkpoints < 1:
            _fail("sweep.stop_at.plateau_checkpoints", self.plateau_checkpoints, "at least 1")
        self._check_stop_checks("sweep.stop_at")


@dataclass(frozen=True)
class SweepConfig:
    """The layer-wise transfer grid; scratch budget and checkpoint interval come from `train`."""

    layers: tuple[int, ...]
    """Layers of the sweep, strictly increasing; each must be in `cache.layers`."""
    finetune_budgets: tuple[int, ...]
    """Token budgets of the transfer trials (each a separate trial)."""
    site: Site = "resid_post"
    """Hook site the SAEs are trained on; must be in `cache.sites`."""
    offsets: tuple[int, ...] = (-1, 1)
    """Source layer = target + offset: -1 is forward SAE_{i<-i-1}, +1 backward SAE_{i<-i+1}."""
    finetune_lr: float = 1e-5
    """Peak learning rate of the transfer trials (paper: 1e-5)."""
    compute_plan: bool = True
    """Add the Appendix B.1 plan: scratch on alternate layers, transfer to the rest."""
    compute_plan_budget_fraction: float = 0.5
    """Fraction of the scratch budget the plan's transfers train for (paper: 10% and 50%)."""
    compute_plan_directions: tuple[ComputePlanDirection, ...] = ("forward", "backward")
    """The plans of Appendix B.1, each counted on its own: `forward` (scratch on the 1st, 3rd,
    ... layer of `layers`, SAE_{i<-i-1} on each other one) and `backward`, its mirror (scratch
    counted from the last layer, SAE_{i<-i+1} on the rest): on 12 layers, scratch on the even
    layers and on the odd ones."""
    compute_plan_from: ComputePlanSource = "checkpoint"
    """Where a plan transfer's SAE comes from: `checkpoint` reads it at the plan's budget from
    the transfer trial of the same pair (the smallest fine-tuning budget with a checkpoint
    there), as the paper's 10% point is the 100M checkpoint of its 500M runs, and trains a run
    only where the grid has no such checkpoint; `run` always trains a run of the plan's budget,
    with its own L1 warm-up and lr decay (`raysae.transfer.grid` says why they differ)."""
    max_failures: int = 2
    """Ray retries per trial before it counts as failed."""
    stop_at: StopConfig | None = None
    """Early stopping of the transfer trials (their budgets become caps); None: every budget
    runs to the end."""
    run_budget_plan: bool = False
    """With a `stop_at.normalized_ces` target: after the transfers, train the cheapest plan for
    that target found on this sweep's transfer curves (what `raysae plan --target` prints) as a
    phase of its own: each planned transfer a run of exactly its planned tokens, with its own
    schedule, so the plan read off checkpoints of longer runs is measured as it would be run."""
    architectures: tuple[Architecture, ...] = ()
    """SAE architectures one sweep compares: each runs the whole grid with `sae` set to it (its
    own trials, keys and parent run, tagged `raysae.architecture`; the activations are cached
    once for all). Empty: `sae.architecture` alone."""

    def __post_init__(self) -> None:
        if self.run_budget_plan and (self.stop_at is None or self.stop_at.normalized_ces is None):
            _fail("sweep.run_budget_plan", True, "a sweep.stop_at.normalized_ces target to plan for")
        if len(set(self.architectures)) != len(self.architectures):
            _fail("sweep.architectures", self.architectures, "no repeated architectures")
        for arch in self.architectures:
            if arch not in ARCHITECTURES:
                _fail("sweep.architectures", arch, allowed())
        if not self.layers or any(i < 0 for i in self.layers):
            _fail("sweep.layers", self.layers, "a non-empty list of non-negative block indices")
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            _fail("sweep.layers", self.layers, "strictly increasing layers (no repeats)")
        if not self.finetune_budgets or any(b < 1 for b in self.finetune_budgets):
            expected = "a non-empty list of positive token counts"
            _fail("sweep.finetune_budgets", self.finetune_budgets, expected)
        if len(set(self.finetune_budgets)) != len(self.finetune_budgets):
            _fail("sweep.finetune_budgets", self.finetune_budgets, "no repeated budgets")
        if 0 in self.offsets:
            _fail("sweep.offsets", self.offsets, "non-zero offsets (0 is the scratch SAE itself)")
        if len(set(self.offsets)) != len(self.offsets):
            _fail("sweep.offsets", self.offsets, "no repeated offsets")
        if self.finetune_lr <= 0:
            _fail("sweep.finetune_lr", self.finetune_lr, "a positive number")
        if not 0 < self.compute_plan_budget_fraction <= 1:
            fraction = self.compute_plan_budget_fraction
            _fail("sweep.compute_plan_budget_fraction", fraction, "a fraction in (0, 1]")
        directions = self.compute_plan_directions
        if not directions or len(set(directions)) != len(directions):
            _fail("sweep.compute_plan_directions", directions,
                  "a non-empty list of 'forward' and/or 'backward', no repeats")
        if self.max_failures < 0:
            _fail("sweep.max_failures", self.max_failures, "a non-negative integer")


@dataclass(frozen=True)
class ProbeConfig:
    """Labelled tokens for probes and steering vectors.

    Either per-token labels (list columns beside `input_ids`, as the toy corpus has: topic,
    number, depth) or one label per text (a `text` column and a scalar label column, any
    dataset `datasets` can load); a per-text label applies to the text's last token.
    """

    source: str
    """Dataset: `toy://<preset>/heldout`, a hub name, or a local parquet/json/csv/arrow file."""
    labels: tuple[str, ...] = ("topic", "number", "depth")
    """Label columns to probe; integer classes, negative = unlabelled token."""
    split: str = "train"
    """Dataset split (hub datasets)."""
    text_column: str = "text"
    """Text column of a per-text labelled dataset (ignored when `input_ids` is present)."""
    num_rows: int = 256
    """Rows read; the first half trains the probes, the second half tests them."""
    sparse_k: tuple[int, ...] = (1, 5, 20)
    """Sizes of the sparse probes: the k SAE features with the largest class-mean difference."""
    steering_label: str = "topic"
    """Label whose classes the steering vectors point to."""
    steering_target: int = 0
    """Target class of the steering vectors."""
    steering_tokens: int = 12
    """Tokens generated per steered prompt."""

    def __post_init__(self) -> None:
        if not self.labels:
            _fail("stitch.probes.labels", self.labels, "at least one label column")
        if self.num_rows < 4:
            _fail("stitch.probes.num_rows", self.num_rows, "at least 4 rows")
        if not self.sparse_k or any(k < 1 for k in self.sparse_k):
            _fail("stitch.probes.sparse_k", self.sparse_k, "a non-empty list of positive sizes")
        if self.steering_tokens < 1:
            _fail("stitch.probes.steering_tokens", self.steering_tokens, "a positive count")


@dataclass(frozen=True)
class StitchConfig(StopChecks):
    """The model-stitching grid: stitch pairs (A layer, B layer), SAE widths and budgets on B.

    A is the job's `model`, B is `large`; both read the job's `data` through one tokenizer.
    SAEs on A train with the job's `train` settings; SAEs on B (from scratch and from the
    stitched initialisation) with the same settings at each of `budgets`. With
    `stop_at_thresholds`, B's SAEs are checked every `check_every_tokens` (`StopChecks`).
    """

    large: ModelConfig
    """The large model B."""
    num_tokens: int
    """Training tokens of each stitch (paper: ~200M)."""
    pairs: tuple[tuple[int, int], ...] = ()
    """Explicit (A layer, B layer) pairs."""
    match_layers: tuple[int, ...] = ()
    """A layers whose B layer is the best match by `match_method` (added to `pairs`)."""
    match_method: Literal["svcca", "cka"] = "svcca"
    """Layer matching: mean SVCCA correlation or linear CKA."""
    match_tokens: int = 4096
    """Tokens (held out from training) the layer matching is computed on."""
    site: Site = "resid_pre"
    """Hook site of the stitch and of every SAE (paper: the residual stream entering a layer)."""
    batch_size: int = 1024
    """Tokens per stitch optimiser step."""
    lr: float = 1e-4
    """Peak learning rate of the stitch (Adam, cosine decay)."""
    lr_warmup_frac: float = 0.0
    """Fraction of the stitch steps spent warming up linearly."""
    alpha: float = 1.0
    """Weight of the two cycle-consistency terms."""
    grad_clip: float = 1.0
    """Gradient-norm clip of the stitch (0 disables)."""
    init: Literal["lstsq", "random"] = "lstsq"
    """Initial maps: the closed-form least-squares fit, or random with zero biases (paper)."""
    lstsq_tokens: int = 65536
    """Tokens the closed-form least-squares fit is computed on."""
    checkpoint_every_tokens: int = 1_000_000
    """Stitch checkpoint interval (resume point)."""
    widths: tuple[int, ...] = (512,)
    """SAE widths d_sae, the same on A and B (the stitched SAE keeps its A width)."""
    budgets: tuple[int, ...] = ()
    """Token budgets of B's SAEs, from scratch and from the stitch (default: train.num_tokens)."""
    ev_thresholds: tuple[float, ...] = (0.7, 0.8, 0.9)
    """Explained variances whose FLOPs-to-reach the analysis compares."""
    stop_at_thresholds: bool = False
    """B's SAEs (scratch and stitched) stop at the first checkpoint whose held-out explained
    variance reaches the largest of `ev_thresholds` (the FLOPs to each threshold are then
    measured by stopping, at the `check_every_tokens` grid)."""
    probes: ProbeConfig | None = None
    """Probes, sparse probes and steering through the stitch; None skips them."""
    variants: str | None = None
    """Content-rewritten variants (group, variant, input_ids) for structural vs semantic features:
    `toy://<preset>/variants` or a parquet file; None skips the feature classes."""
    max_failures: int = 2
    """Ray retries per trial before it counts as failed."""

    def __post_init__(self) -> None:
        if not self.pairs and not self.match_layers:
            _fail("stitch.pairs", self.pairs, "at least one (A layer, B layer) pair or match_layers")
        for pair in self.pairs:
            if len(pair) != 2 or min(pair) < 0:
                _fail("stitch.pairs", pair, "a pair [A layer, B layer] of block indices")
        if len(set(self.pairs)) != len(self.pairs):
            _fail("stitch.pairs", self.pairs, "no repeated pairs")
        if any(i < 0 for i in self.match_layers):
            _fail("stitch.match_layers", self.match_layers, "non-negative block indices")
        positive = {"num_tokens": self.num_tokens, "batch_size": self.batch_size,
                    "match_tokens": self.match_tokens, "lstsq_tokens": self.lstsq_tokens,
                    "checkpoint_every_tokens": self.checkpoint_every_tokens}
        for name, value in positive.items():
            if value < 1:
                _fail(f"stitch.{name}", value, "a positive integer")
        if self.num_tokens < self.batch_size:
            _fail("stitch.num_tokens", self.num_tokens,
                  f"at least stitch.batch_size ({self.batch_size})")
        if self.lr <= 0 or self.alpha < 0 or self.grad_clip < 0:
            _fail("stitch.lr/alpha/grad_clip", (self.lr, self.alpha, self.grad_clip),
                  "lr > 0, alpha >= 0, grad_clip >= 0")
        if not 0 <= self.lr_warmup_frac < 1:
            _fail("stitch.lr_warmup_frac", self.lr_warmup_frac, "a fraction in [0, 1)")
        if not self.widths or any(w < 1 for w in self.widths) or len(set(self.widths)) != len(
            self.widths
        ):
            _fail("stitch.widths", self.widths, "distinct positive SAE widths (d_sae)")
        if any(b < 1 for b in self.budgets) or len(set(self.budgets)) != len(self.budgets):
            _fail("stitch.budgets", self.budgets, "distinct positive token counts")
        if not self.ev_thresholds or any(not 0 < t < 1 for t in self.ev_thresholds):
            _fail("stitch.ev_thresholds", self.ev_thresholds, "fractions in (0, 1)")
        self._check_stop_checks("stitch")
        if self.max_failures < 0:
            _fail("stitch.max_failures", self.max_failures, "a non-negative integer")


@dataclass(frozen=True)
class FeaturesConfig:
    """Feature-quality evaluations run on every SAE a sweep trains (`raysae.features.circuits`,
    `raysae.features.dashboard`): task circuits by attribution patching, their faithfulness and
    completeness, direct logit attribution, and static HTML feature dashboards."""

    tasks: tuple[str, ...] = ()
    """Contrastive task sets (`raysae.features.tasks`): `toy://<preset>/tasks`, a token-id task parquet,
    a shipped template (`ioi`, `greater_than`, `sva`) or a template YAML file."""
    examples_per_task: int = 64
    """Examples drawn per task (paper: 64 handcrafted prompts for DLA)."""
    faithfulness_n: tuple[float, ...] = (0.02, 0.04, 0.06, 0.08)
    """Circuit sizes N of faithfulness: a fraction of d_sae in (0, 1), rounded to the nearest
    count (half up, at least 1), or a feature count >= 1. Paper (§2.3): 2%, 4%, 6%, 8% of d_sae,
    which it gives as 123, 246, 368, 492 at d_sae 6144 (rounding gives 369 for 6%: the paper
    config lists the paper's counts)."""
    completeness_n: tuple[float, ...] = (4, 36, 68, 100)
    """Circuit sizes N of completeness, in the same form (paper, §2.3: 4, 36, 68, 100)."""
    min_feature_effect: float = 0.25
    """Faithfulness and completeness of a task are NaN (not averaged in) where mean-ablating
    every feature moves m by at most this share of the model's m: eq. 8 divides by that move."""
    exact_check_features: int = 16
    """Per task, the features of largest |IE| also patched exactly; the correlation of
    attribution patching with exact patching is logged (0 skips the check)."""
    checkpoints: Literal["all", "final"] = "all"
    """Evaluate circuits at every training checkpoint, or on the final SAE only."""
    dashboard_features: int = 32
    """Features given a dashboard page per SAE (a seeded sample of the live ones); 0: none."""
    dashboard_contexts: int = 10
    """Max-activating contexts shown per feature."""
    batch_size: int = 16
    """Prompts (circuits) or token windows (dashboards) per forward pass."""

    def __post_init__(self) -> None:
        if self.examples_per_task < 2:
            _fail("features.examples_per_task", self.examples_per_task, "at least 2")
        for name in ("faithfulness_n", "completeness_n"):
            sizes = getattr(self, name)
            if not sizes or any(v <= 0 or (v > 1 and v != int(v)) for v in sizes):
                _fail(f"features.{name}", sizes, "a non-empty list of fractions of d_sae in "
                      "(0, 1) or whole feature counts >= 1")
        if not 0 <= self.min_feature_effect < 1:
            _fail("features.min_feature_effect", self.min_feature_effect, "a fraction in [0, 1)")
        for name in ("exact_check_features", "dashboard_features"):
            if getattr(self, name) < 0:
                _fail(f"features.{name}", getattr(self, name), "a non-negative count")
        if self.dashboard_contexts < 1 or self.batch_size < 1:
            _fail("features.dashboard_contexts/batch_size",
                  (self.dashboard_contexts, self.batch_size), "positive counts")
        if not self.tasks and self.dashboard_features == 0:
            _fail("features.tasks", self.tasks,
                  "at least one task set, or dashboard_features > 0 (else nothing to evaluate)")


def load_config(path: str | Path) -> JobConfig:
    """Read a YAML job config; raise ConfigError naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark, start = e.problem_mark, e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        opened = f" ({e.context} opened at line {start.line + 1}, column {start.column + 1})"
        raise ConfigError(
            f"{where}: invalid YAML: {e.problem or e}{opened if e.context and start else ''}"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return from_dict(JobConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
