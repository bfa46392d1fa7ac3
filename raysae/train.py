"""The SAE training loop: token budgets, schedules, checkpoints and dead-latent tracking.

`train_sae` takes an SAE, a `TrainConfig` and an iterator of activation batches ([B, d_in]
tensors) and runs Adam until exactly `cfg.num_tokens` tokens have been seen (the last batch is
trimmed). It knows nothing of language models, Ray or MLflow: callers observe it through two
callbacks, `on_metrics(tokens_seen, metrics)` at log steps and `on_checkpoint(state)` every
`cfg.checkpoint_every_tokens`, and resume it from a `TrainState`.

Data parallelism plugs in through `allreduce_grads(params)`, called after the backward pass and
before clipping; it must leave each `p.grad` holding the average over workers. Each worker then
feeds batches of `cfg.batch_size // world_size` rows and passes `world_size`, so token counts,
schedules and checkpoints stay global. (Wrapping the SAE in DDP does not work: the loop calls
`SAE.train_forward`, which DDP's forward hooks never see.)

Every per-step operation stays on the device; the host reads values only at log steps.
Checkpoints hold only tensors (safetensors) and JSON scalars: nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from raysae import metrics
from raysae.config import TrainConfig
from raysae.sae import SAE, TrainOutput, write_folder_atomically

MetricsFn = Callable[[int, dict[str, float]], None]
CheckpointFn = Callable[["TrainState"], None]
AllReduceFn = Callable[[list[Tensor]], None]

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


# ---------------------------------------------------------------------------------------------
# Schedules (pure functions of the step)


def total_steps(cfg: TrainConfig) -> int:
    """Optimiser steps in the token budget (the last one may be a partial batch)."""
    return math.ceil(cfg.num_tokens / cfg.batch_size)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate at 0-based `step` of `total`: linear warm-up, constant, linear decay.

    Warm-up covers the first round(lr_warmup_frac·total) steps and reaches the peak on its last
    step (step 0 already moves, at lr/warmup). Decay covers the last round(lr_decay_frac·total)
    steps, starting at the peak and heading linearly to zero: the last step uses lr/decay.
    """
    warmup = round(cfg.lr_warmup_frac * total)
    decay = round(cfg.lr_decay_frac * total)
    step = min(max(step, 0), total - 1)
    scale = 1.0
    if step < warmup:
        scale = (step + 1) / warmup
    decay_start = total - decay
    if decay > 0 and step >= decay_start:
        scale = min(scale, (total - step) / decay)
    return cfg.lr * scale


def l1_coeff_at(step: int, total: int, cfg: TrainConfig, coefficient: float) -> float:
    """Sparsity coefficient at `step`: linear ramp over the first l1_warmup_frac of the steps."""
    warmup = round(cfg.l1_warmup_frac * total)
    if warmup == 0:
        return coefficient
    return coefficient * min(1.0, (step + 1) / warmup)


# ---------------------------------------------------------------------------------------------
# Resumable state


@dataclass
class TrainState:
    """Everything needed to continue a run exactly: weights, Adam moments, counters, RNG."""

    step: int
    """Optimiser steps taken."""
    tokens_seen: int
    """Tokens consumed (global across workers)."""
    sae: dict[str, Tensor]
    """The SAE's parameters (`state_dict`, on the CPU)."""
    optimizer: dict[str, Tensor]
    """Adam's per-parameter state, flattened to `{param_index}.{name}` keys."""
    tokens_since_fired_F: Tensor
    """Per latent, tokens since it last fired (int64)."""
    rng: dict[str, Tensor]
    """torch RNG states: `cpu`, and `cuda` when training on a GPU."""


def save_state_folder(
    path: str | Path, groups: dict[str, dict[str, Tensor]], scalars: dict[str, int]
) -> Path:
    """Write named tensor groups to safetensors (`group.name` keys) and scalars to JSON, as one
    folder replaced atomically (resumable training states: no pickles)."""
    tensors = {f"{g}.{k}": v for g, members in groups.items() for k, v in members.items()}

    def write(tmp: Path) -> None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS)
        )
        (tmp / STATE_JSON).write_text(json.dumps(scalars))

    return write_folder_atomically(path, write)


def load_state_folder(path: str | Path, groups: tuple[str, ...]) -> tuple[dict, dict]:
    """Read a folder written by `save_state_folder`: (scalars, {group: tensors})."""
    path = Path(path)
    scalars = json.loads((path / STATE_JSON).read_text())
    tensors = load_file(str(path / STATE_TENSORS))
    return scalars, {
        g: {k[len(g) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{g}.")} for g in groups
    }


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    """The optimiser's per-parameter state flattened to `{param_index}.{name}` CPU copies."""
    return {
        f"{i}.{name}": value.detach().cpu().clone()
        for i, per_param in opt.state_dict()["state"].items()
        for name, value in per_param.items()
    }


def load_optimizer_tensors(opt: torch.optim.Optimizer, flat: dict[str, Tensor]) -> None:
    """Inverse of `optimizer_tensors`."""
    per_param: dict[int, dict[str, Tensor]] = {}
    for key, value in flat.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": per_param, "param_groups": opt.state_dict()["param_groups"]})


def save_train_state(state: TrainState, path: str | Path) -> Path:
    """Write a state folder: tensors to safetensors, scalars to JSON; replaced atomically."""
    groups = {"sae": state.sae, "optimizer": state.optimizer, "rng": state.rng,
              "misc": {"tokens_since_fired_F": state.tokens_since_fired_F}}
    return save_state_folder(path, groups, {"step": state.step, "tokens_seen": state.tokens_seen})


def load_train_state(path: str | Path) -> TrainState:
    """Read a folder written by `save_train_state` (JSON + safetensors only)."""
    scalars, g = load_state_folder(path, ("sae", "optimizer", "rng", "misc"))
    return TrainState(
        step=int(scalars["step"]),
        tokens_seen=int(scalars["tokens_seen"]),
        sae=g["sae"],
        optimizer=g["optimizer"],
        tokens_since_fired_F=g["misc"]["tokens_since_fired_F"],
        rng=g["rng"],
    )


def make_optimizer(sae: SAE, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam over the SAE's parameters with the configured betas (fused where torch has it)."""
    b1, b2 = cfg.adam_betas
    return torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(b1, b2), fused=True)


def _snapshot(
    sae: SAE, opt: torch.optim.Adam, step: int, tokens: int, since_F: Tensor
) -> TrainState:
    optim = optimizer_tensors(opt)
    rng = {"cpu": torch.get_rng_state()}
    if sae.W_enc.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(sae.W_enc.device)
    return TrainState(
        step=step,
        tokens_seen=tokens,
        sae={k: v.detach().cpu().clone() for k, v in sae.state_dict().items()},
        optimizer=optim,
        tokens_since_fired_F=since_F.detach().cpu().clone(),
        rng=rng,
    )


def _restore(sae: SAE, opt: torch.optim.Adam, state: TrainState) -> Tensor:
    sae.load_state_dict(state.sae)
    load_optimizer_tensors(opt, state.optimizer)
    torch.set_rng_state(state.rng["cpu"])
    if "cuda" in state.rng and sae.W_enc.device.type == "cuda":
        torch.cuda.set_rng_state(state.rng["cuda"], sae.W_enc.device)
    return state.tokens_since_fired_F.to(sae.W_enc.device)


# ---------------------------------------------------------------------------------------------
# The loop


class _Window:
    """On-device running sums between two log steps (no host sync until `read`)."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.steps = 0

    def add(self, out: TrainOutput, x_BD: Tensor) -> None:
        # The batch's total variance E||x||² - ||E x||², for the explained variance, from two
        # allocation-free passes; the difference is taken in float64.
        B = x_BD.shape[0]
        sq = torch.linalg.vector_norm(x_BD.detach()).square().to(torch.float64) / B
        mean_sq = (x_BD.new_ones(B) @ x_BD.detach() / B).square().sum().to(torch.float64)
        parts = torch.stack([out.loss.detach(), out.mse.detach(), out.sparsity.detach()])
        self.sums[:3] += parts.to(torch.float64)
        self.sums[3] += sq - mean_sq
        self.steps += 1

    def read(self) -> dict[str, float]:
        loss, mse, sparsity, total_var = (self.sums / max(self.steps, 1)).tolist()
        self.sums.zero_()
        self.steps = 0
        ev = 1.0 - mse / total_var if total_var > 0 else float("nan")
        return {"loss": loss, "mse": mse, "sparsity": sparsity, "explained_variance": ev}


def _train_step(
    sae: SAE,
    opt: torch.optim.Optimizer,
    x_BD: Tensor,
    lr: float,
    sparsity_coeff: float,
    cfg: TrainConfig,
    allreduce_grads: AllReduceFn | None,
) -> TrainOutput:
    """One optimiser step on one batch; returns the (pre-update) losses."""
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast(sae.W_enc.device.type, torch.bfloat16, enabled=cfg.autocast_bf16):
        out = sae.train_forward(x_BD, sparsity_coeff)
    out.loss.backward()
    params = [p for p in sae.parameters() if p.grad is not None]
    if allreduce_grads is not None:
        allreduce_grads(params)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if sae.cfg.architecture == "topk":
        sae.normalize_decoder_()
    return out


def _rows_times_width(weight_or_grad: tuple, indices: tuple, *_a: object, **_k: object) -> int:
    """A weighted gather or scatter of len(indices) rows of width D: a multiply-add each."""
    return 2 * math.prod(indices) * weight_or_grad[-1]


def _bag_weights_backward(grad: tuple, weight: tuple, indices: tuple, *_a: object, **_k: object) -> int:
    return 2 * math.prod(indices) * weight[-1]


def _index_add(_self: tuple, _dim: int, _index: tuple, source: tuple, *_a: object, **_k: object) -> int:
    return math.prod(source)


def _mv(a: tuple, _b: tuple, *_a: object, **_k: object) -> int:
    return 2 * math.prod(a)


# TopK's sparse decode and backward run through ops FlopCounterMode has no formula for; count
# them too, so a TopK step is not credited with the encoder alone.
_SPARSE_FLOPS = {
    torch.ops.aten._embedding_bag: _rows_times_width,
    torch.ops.aten._embedding_bag_backward: _rows_times_width,
    torch.ops.aten._embedding_bag_per_sample_weights_backward: _bag_weights_backward,
    torch.ops.aten.index_add_: _index_add,
    torch.ops.aten.mv: _mv,
}


def flops_per_token(sae: SAE, x_BD: Tensor, cfg: TrainConfig) -> float:
    """FLOPs of one training step per token, counted (not estimated) with torch's
    FlopCounterMode over the forward and backward of a copy of the SAE (the optimiser's
    elementwise update is not a matmul and is not counted, as in the stitching paper)."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(sae)
    with FlopCounterMode(display=False, custom_mapping=_SPARSE_FLOPS) as counter:
        with torch.autocast(x_BD.device.type, torch.bfloat16, enabled=cfg.autocast_bf16):
            out = probe.train_forward(x_BD, 1.0)
        out.loss.backward()
    return counter.get_total_flops() / x_BD.shape[0]


@torch.no_grad()
def _batch_probe(sae: SAE, x_BD: Tensor) -> dict[str, float]:
    """Statistics that need the dense latents; computed only at log steps."""
    feats_BF = sae.encode(x_BD)
    counts_F = (feats_BF > 0).sum(0)
    return {
        "l0": metrics.l0(feats_BF),
        "dense_fraction": metrics.dense_fraction(counts_F, x_BD.shape[0]),
    }


def _next_batch(it: Iterator[Tensor], remaining: int, world_size: int, like: Tensor) -> Tensor:
    try:
        batch = next(it)
    except StopIteration:
        raise ValueError(
            f"the activation batches ran out {remaining} tokens before the token budget; "
            "cache more tokens or lower train.num_tokens"
        ) from None
    rows = -(-remaining // world_size)  # trim the last batch so the budget is met exactly
    return batch[:rows].to(device=like.device, dtype=like.dtype, non_blocking=True)


def _checkpoint_if_needed(
    tokens_before: int,
    tokens_after: int,
    cfg: TrainConfig,
    on_checkpoint: CheckpointFn | None,
    snapshot: Callable[[], TrainState],
) -> None:
    """Checkpoint on crossing a multiple of checkpoint_every_tokens, and at the end."""
    every = cfg.checkpoint_every_tokens
    crossed = tokens_after // every > tokens_before // every
    if on_checkpoint is not None and (crossed or tokens_after >= cfg.num_tokens):
        on_checkpoint(snapshot())


def train_sae(
    sae: SAE,
    cfg: TrainConfig,
    batches: Iterable[Tensor],
    *,
    on_metrics: MetricsFn | None = None,
    on_checkpoint: CheckpointFn | None = None,
    start_state: TrainState | None = None,
    allreduce_grads: AllReduceFn | None = None,
    world_size: int = 1,
) -> TrainState:
    """Train `sae` in place on `batches` until exactly `cfg.num_tokens` tokens; return the state.

    When resuming from `start_state`, `batches` must continue where that run's data stopped
    (at `start_state.tokens_seen`); the result is then identical to an uninterrupted run.
    """
    total = total_steps(cfg)
    opt = make_optimizer(sae, cfg)
    device = sae.W_enc.device
    step, tokens = 0, 0
    since_F = torch.zeros(sae.d_sae, dtype=torch.int64, device=device)
    if start_state is not None:
        since_F = _restore(sae, opt, start_state)
        step, tokens = start_state.step, start_state.tokens_seen
    window = _Window(device)
    it = iter(batches)
    clock, clock_tokens = time.perf_counter(), tokens

    while tokens < cfg.num_tokens:
        x_BD = _next_batch(it, cfg.num_tokens - tokens, world_size, sae.W_enc)
        n = x_BD.shape[0] * world_size
        log_now = on_metrics is not None and (
            (step + 1) % cfg.log_every_steps == 0 or tokens + n >= cfg.num_tokens
        )
        probe = _batch_probe(sae, x_BD) if log_now else {}
        lr = lr_at(step, total, cfg)
        coeff = l1_coeff_at(step, total, cfg, sae.cfg.l1_coefficient)
        out = _train_step(sae, opt, x_BD, lr, coeff, cfg, allreduce_grads)
        since_F.add_(n).masked_fill_(out.fired_F, 0)
        window.add(out, x_BD)
        step, tokens_before, tokens = step + 1, tokens, tokens + n

        if log_now:
            assert on_metrics is not None
            now = time.perf_counter()
            report = window.read() | probe
            report |= {
                "dead_fraction": metrics.dead_fraction(since_F, cfg.dead_window_tokens),
                "lr": lr,
                "sparsity_coeff": coeff,
                "step": float(step),
                "tokens_per_second": (tokens - clock_tokens) / max(now - clock, 1e-9),
            }
            clock, clock_tokens = now, tokens
            on_metrics(tokens, report)
        snapshot = partial(_snapshot, sae, opt, step, tokens, since_F)
        _checkpoint_if_needed(tokens_before, tokens, cfg, on_checkpoint, snapshot)
    return _snapshot(sae, opt, step, tokens, since_F)


def checkpoint_to(folder: str | Path, sae: SAE) -> CheckpointFn:
    """An `on_checkpoint` that writes `folder/tokens_{n}/` with `state/` and a SAELens `sae/`.

    The SAE folder is the evaluable artefact; `state/` is what `load_train_state` resumes from.
    """
    folder = Path(folder)

    def save(state: TrainState) -> None:
        out = folder / f"tokens_{state.tokens_seen}"
        save_train_state(state, out / "state")
        sae.save(out / "sae")

    return save
