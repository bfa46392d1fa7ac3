"""The training loop SAEs and stitches share, and the SAE's half of it.

`Trainer` is the skeleton: stepped batch by batch until exactly `num_tokens` tokens have been seen
(the last batch trimmed), sets each step's learning rate from a schedule, runs the backward
pass, `allreduce_grads`, gradient clipping and the optimiser step, averages metrics on the device
between log steps, and resumes from a `TrainState`. Callers observe it through two callbacks,
`on_metrics(tokens_seen, metrics)` at log steps and `on_checkpoint(state)` on crossing a multiple
of `checkpoint_every_tokens`, both also at the end. What is trained plugs in as a `Learner`:
`SAELearner` here (`train_sae`), `StitchLearner` in `raysae.stitching.stitch` (`train_stitch`).
It knows nothing of language models, Ray or MLflow.

Data parallelism plugs in through `allreduce_grads(params)`, called after the backward pass and
before clipping; it must leave each `p.grad` holding the average over workers. Each worker then
feeds batches of `batch_size // world_size` rows and passes `world_size`, so token counts,
schedules and checkpoints stay global. (Wrapping the SAE in DDP does not work: the loop calls
`SAE.train_forward`, which DDP's forward hooks never see.)

Every per-step operation stays on the device; the host reads values only at log steps.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from raysae import metrics
from raysae.architectures import (  # re-exported: the dense count sits with the specs
    dense_sae_flops_per_token as dense_sae_flops_per_token,
)
from raysae.checkpoint import TrainState, load_optimizer_tensors, optimizer_tensors
from raysae.config import StitchConfig, TrainConfig
from raysae.sae import SAE

MetricsFn = Callable[[int, dict[str, float]], None]
CheckpointFn = Callable[[TrainState], None]
AllReduceFn = Callable[[list[Tensor]], None]


# ---------------------------------------------------------------------------------------------
# The loop skeleton


class LoopSettings(NamedTuple):
    """What the loop reads from a `TrainConfig` or a `StitchConfig`."""

    num_tokens: int
    checkpoint_every_tokens: int
    log_every_steps: int
    grad_clip: float
    """Gradient-norm clip (0 disables)."""
    section: str
    """The config section that sets num_tokens ("train", "stitch"), named in errors."""


class StepOutput(NamedTuple):
    """A learner's loss on one batch."""

    loss: Tensor
    """The scalar the backward pass starts from."""
    window: dict[str, Tensor]
    """Named float64 values (scalars, or vectors such as one per Matryoshka prefix) averaged on
    the device between log steps; `Learner.report` reads their means by these names. Every
    step of a learner gives the same names and shapes."""
    detail: Any = None
    """The learner's own output (the SAE's `TrainOutput`), for its `after_step`."""


class LogPoint(NamedTuple):
    """Where the loop stands at a log step."""

    step: int
    """Optimiser steps taken."""
    lr: float
    """The learning rate of the last step."""
    tokens_per_second: float
    """Throughput since the previous log step."""


class Learner(Protocol):
    """What differs between training an SAE and a stitch; the loop does the rest."""

    model: nn.Module
    """The module trained in place; its `state_dict` is `TrainState.model`."""
    counters: dict[str, Tensor]
    """Tensors updated in place across steps, saved in `TrainState.extra`."""

    def lr(self, step: int) -> float:
        """The learning rate of 0-based `step` (the schedule)."""

    def prepare(self, raw: Any, rows: int) -> tuple[Any, int]:
        """A raw batch trimmed to at most `rows` rows on the model's device, and its rows."""

    def loss(self, batch: Any, step: int) -> StepOutput:
        """The forward pass of `step`."""

    def after_step(self, batch: Any, out: StepOutput) -> None:
        """Anything to do after the optimiser step (counters, constraints on the weights)."""

    def probe(self, batch: Any) -> dict[str, float]:
        """Metrics of the batch before the step, computed only at log steps."""

    def report(self, means: Means, at: LogPoint) -> dict[str, float]:
        """The named metrics of a log step, from the window's means."""


Means = dict[str, Any]
"""A window's means by name: a float per scalar, a list of floats per vector."""


class _Window:
    """On-device running sums of a step's named values between two log steps: one flat tensor,
    so a step adds once and `read` makes the one host transfer of a log step."""

    def __init__(self) -> None:
        self.sums: Tensor | None = None
        self.shapes: dict[str, torch.Size] = {}
        self.steps = 0

    def add(self, values: dict[str, Tensor]) -> None:
        flat = torch.cat([v.reshape(-1) for v in values.values()])
        if self.sums is None:
            self.sums = torch.zeros_like(flat)
            self.shapes = {name: v.shape for name, v in values.items()}
        elif values.keys() != self.shapes.keys():
            raise ValueError(f"a step's window names {list(values)}, expected {list(self.shapes)}")
        self.sums += flat
        self.steps += 1

    def read(self) -> Means:
        assert self.sums is not None
        flat = (self.sums / max(self.steps, 1)).tolist()
        self.sums.zero_()
        self.steps = 0
        means, at = {}, 0
        for name, shape in self.shapes.items():
            n = shape.numel()
            means[name] = flat[at] if len(shape) == 0 else flat[at:at + n]
            at += n
        return means


class Diverged(RuntimeError):
    """A non-finite gradient (from a non-finite loss, or an overflow): training stops there; the
    last checkpoint before it is the last good state."""

    def __init__(self, step: int, tokens: int, section: str) -> None:
        super().__init__(
            f"training diverged: non-finite loss or gradient at step {step:,} ({tokens:,} tokens "
            f"seen); the checkpoints before it are kept. Lower {section}.lr or raise the "
            f"warm-up, and check the inputs for NaN or inf")
        self.step, self.tokens = step, tokens


def train_step(
    learner: Learner,
    opt: torch.optim.Optimizer,
    batch: Any,
    step: int,
    lr: float,
    grad_clip: float,
    allreduce_grads: AllReduceFn | None = None,
) -> tuple[StepOutput, Tensor]:
    """One optimiser step on one batch, as `Trainer` runs it (and the benchmark times it);
    returns the (pre-update) loss and, on the device, whether the gradient (after the
    all-reduce, so the same on every worker) was finite."""
    for group in opt.param_groups:
        group["lr"] = lr
    out = learner.loss(batch, step)
    out.loss.backward()
    params = [p for p in learner.model.parameters() if p.grad is not None]
    if allreduce_grads is not None:
        allreduce_grads(params)
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    learner.after_step(batch, out)
    return out, torch.isfinite(norm)


def _checkpoint_due(tokens_before: int, tokens_after: int, loop: LoopSettings) -> bool:
    """On crossing a multiple of checkpoint_every_tokens, and at the end."""
    every = loop.checkpoint_every_tokens
    return tokens_after // every > tokens_before // every or tokens_after >= loop.num_tokens


def _snapshot(learner: Learner, opt: torch.optim.Optimizer, step: int, tokens: int) -> TrainState:
    device = next(learner.model.parameters()).device
    extra = {"rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        extra["rng_cuda"] = torch.cuda.get_rng_state(device)
    extra |= {k: v.detach().cpu().clone() for k, v in learner.counters.items()}
    model = {k: v.detach().cpu().clone() for k, v in learner.model.state_dict().items()}
    return TrainState(step, tokens, model, optimizer_tensors(opt), extra)


def _restore(learner: Learner, opt: torch.optim.Optimizer, state: TrainState) -> tuple[int, int]:
    device = next(learner.model.parameters()).device
    learner.model.load_state_dict(state.model)
    load_optimizer_tensors(opt, state.optimizer)
    torch.set_rng_state(state.extra["rng_cpu"])
    if "rng_cuda" in state.extra and device.type == "cuda":
        torch.cuda.set_rng_state(state.extra["rng_cuda"], device)
    for name, counter in learner.counters.items():
        counter.copy_(state.extra[name])
    return state.step, state.tokens_seen


class Trainer:
    """The loop's state for one learner, advanced one batch at a time: `run_trainer` drives one,
    and a group of SAEs on one activation stream drives several from the same batches, each
    stopping at its own budget."""

    def __init__(
        self,
        learner: Learner,
        opt: torch.optim.Optimizer,
        loop: LoopSettings,
        *,
        on_metrics: MetricsFn | None = None,
        on_checkpoint: CheckpointFn | None = None,
        start_state: TrainState | None = None,
        allreduce_grads: AllReduceFn | None = None,
        world_size: int = 1,
    ) -> None:
        self.learner, self.opt, self.loop = learner, opt, loop
        self.on_metrics, self.on_checkpoint = on_metrics, on_checkpoint
        self.allreduce_grads, self.world_size = allreduce_grads, world_size
        self.step_no, self.tokens = (0, 0) if start_state is None else _restore(learner, opt, start_state)
        self.window = _Window()
        self.clock, self.clock_tokens = time.perf_counter(), self.tokens
        device = next(learner.model.parameters()).device
        # the first step (and its tokens) whose gradient was not finite, -1 while none: kept on
        # the device, read by the host only where it syncs anyway (log steps, checkpoints)
        self.first_bad = torch.full((2,), -1, dtype=torch.long, device=device)
        # (step, tokens) mirrored on the device, advanced by scalar adds: no host-to-device copy
        # (a synchronising one from pageable memory on a GPU) in the step
        self._at = torch.tensor([self.step_no, self.tokens], dtype=torch.long, device=device)

    @property
    def done(self) -> bool:
        return self.tokens >= self.loop.num_tokens

    def step(self, raw: Any) -> None:
        """One optimiser step on `raw` (trimmed so that the budget is met exactly), then the
        log and checkpoint callbacks when due."""
        loop, learner = self.loop, self.learner
        remaining = loop.num_tokens - self.tokens
        batch, rows = learner.prepare(raw, -(-remaining // self.world_size))
        n = rows * self.world_size
        log_step = (self.step_no + 1) % loop.log_every_steps == 0 or n >= remaining
        log_now = self.on_metrics is not None and log_step
        probe = learner.probe(batch) if log_now else {}
        lr = learner.lr(self.step_no)
        out, finite = train_step(learner, self.opt, batch, self.step_no, lr, loop.grad_clip,
                                 self.allreduce_grads)
        self.window.add(out.window)
        self.step_no, tokens_before, self.tokens = self.step_no + 1, self.tokens, self.tokens + n
        self._at[0] += 1
        self._at[1] += n
        self.first_bad = torch.where(finite | (self.first_bad[0] >= 0), self.first_bad, self._at)

        checkpoint_step = _checkpoint_due(tokens_before, self.tokens, loop)
        if log_step or checkpoint_step:  # the same steps on every worker, whatever it logs
            self.check_finite()
        checkpoint_now = self.on_checkpoint is not None and checkpoint_step
        if log_now:
            assert self.on_metrics is not None
            now = time.perf_counter()
            at = LogPoint(self.step_no, lr, (self.tokens - self.clock_tokens) / max(now - self.clock, 1e-9))
            self.clock, self.clock_tokens = now, self.tokens
            self.on_metrics(self.tokens, learner.report(self.window.read(), at) | probe)
        if checkpoint_now:
            assert self.on_checkpoint is not None
            self.on_checkpoint(self.state())

    def check_finite(self) -> None:
        """Raise `Diverged` if a step since the start had a non-finite gradient."""
        step, tokens = self.first_bad.tolist()
        if step >= 0:
            raise Diverged(step, tokens, self.loop.section)

    def state(self) -> TrainState:
        return _snapshot(self.learner, self.opt, self.step_no, self.tokens)

    def out_of_data(self) -> ValueError:
        """The error for batches that ran out before the budget, naming both numbers."""
        return ValueError(
            f"the activation batches ran out after {self.tokens:,} of the {self.loop.num_tokens:,} "
            f"tokens of the budget ({self.loop.num_tokens - self.tokens:,} short); cache or stream "
            f"more tokens (data.num_tokens), raise train.data_passes, or lower "
            f"{self.loop.section}.num_tokens"
        )


def run_trainer(trainer: Trainer, batches: Iterable[Any]) -> TrainState:
    """Step `trainer` on `batches` until its budget; the out-of-data error names both numbers.

    When resuming, `batches` must continue where that run's data stopped (at the start state's
    `tokens_seen`); the result is then identical to an uninterrupted run.
    """
    it = iter(batches)
    while not trainer.done:
        raw = next(it, None)
        if raw is None:
            raise trainer.out_of_data()
        trainer.step(raw)
    return trainer.state()


# ---------------------------------------------------------------------------------------------
# The SAE: schedules (pure functions of the step) and its learner


def total_steps(cfg: TrainConfig | StitchConfig) -> int:
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


def make_optimizer(sae: SAE, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam over the SAE's parameters with the configured betas (fused where torch has it)."""
    b1, b2 = cfg.adam_betas
    return torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(b1, b2), fused=True)


class SAELearner:
    """An SAE as a `Learner`: warm-up/constant/decay lr with an L1 warm-up, bf16 autocast,
    decoder renormalisation for the k architectures, a dead-latent counter (which also picks
    AuxK's dead latents: not fired in `dead_window_tokens`), the BatchTopK threshold's running
    estimate, l0 and dense fraction at log steps (and the threshold, AuxK loss and each
    Matryoshka prefix's mse and explained variance where they exist)."""

    def __init__(self, sae: SAE, cfg: TrainConfig, world_size: int = 1) -> None:
        self.model, self.cfg, self.world_size = sae, cfg, world_size
        self.total = total_steps(cfg)
        self.since_F = torch.zeros(sae.d_sae, dtype=torch.int64, device=sae.W_enc.device)
        self.counters = {"tokens_since_fired_F": self.since_F}

    def lr(self, step: int) -> float:
        return lr_at(step, self.total, self.cfg)

    def sparsity_coeff(self, step: int) -> float:
        return l1_coeff_at(step, self.total, self.cfg, self.model.cfg.l1_coefficient)

    def prepare(self, raw: Tensor, rows: int) -> tuple[Tensor, int]:
        like = self.model.W_enc
        x_BD = raw[:rows].to(device=like.device, dtype=like.dtype, non_blocking=True)
        return x_BD, x_BD.shape[0]

    def loss(self, x_BD: Tensor, step: int) -> StepOutput:
        sae, coeff = self.model, self.sparsity_coeff(step)
        dead_F = None
        if sae.cfg.uses_k and sae.cfg.aux_coefficient > 0:
            dead_F = self.since_F >= self.cfg.dead_window_tokens
        with torch.autocast(sae.W_enc.device.type, torch.bfloat16, enabled=self.cfg.autocast_bf16):
            out = sae.train_forward(x_BD, coeff, dead_F)
        # The batch's total variance E||x||² - ||E x||², for the explained variance, from two
        # allocation-free passes; the difference is taken in float64.
        B, x = x_BD.shape[0], x_BD.detach()
        sq = torch.linalg.vector_norm(x).square().to(torch.float64) / B
        mean_sq = (x.new_ones(B) @ x / B).square().sum().to(torch.float64)
        named = {"loss": out.loss, "mse": out.mse, "sparsity": out.sparsity,
                 "auxk_loss": out.auxk_loss, "total_variance": sq - mean_sq,
                 "prefix_mse": out.prefix_mse}  # (the last two: the explained variances)
        window = {k: v.detach().to(torch.float64) for k, v in named.items() if v is not None}
        return StepOutput(out.loss, window, out)

    def after_step(self, x_BD: Tensor, out: StepOutput) -> None:
        self.model.after_step_(out.detail)
        self.since_F.add_(x_BD.shape[0] * self.world_size).masked_fill_(out.detail.fired_F, 0)

    @torch.no_grad()
    def probe(self, x_BD: Tensor) -> dict[str, float]:
        feats_BF = self.model.encode(x_BD)
        counts_F = (feats_BF > 0).sum(0)
        out = {
            "l0": metrics.l0(feats_BF),
            "dense_fraction": metrics.dense_fraction(counts_F, x_BD.shape[0]),
        }
        return out | self.model.probe_metrics()

    def report(self, means: Means, at: LogPoint) -> dict[str, float]:
        total_var = means["total_variance"]

        def ev(err: float) -> float:
            return 1.0 - err / total_var if total_var > 0 else float("nan")

        out = {k: means[k] for k in ("auxk_loss",) if k in means}
        for w, err in zip(self.model.widths, means.get("prefix_mse", ())):
            out[f"mse_prefix_{w}"], out[f"explained_variance_prefix_{w}"] = err, ev(err)
        return out | {
            "loss": means["loss"],
            "mse": means["mse"],
            "sparsity": means["sparsity"],
            "explained_variance": ev(means["mse"]),
            "dead_fraction": metrics.dead_fraction(self.since_F, self.cfg.dead_window_tokens),
            "lr": at.lr,
            "sparsity_coeff": self.sparsity_coeff(at.step - 1),
            "step": float(at.step),
            "tokens_per_second": at.tokens_per_second,
        }


def sae_trainer(sae: SAE, cfg: TrainConfig, *, world_size: int = 1, **kwargs: Any) -> Trainer:
    """The loop for one SAE; `kwargs` are the `Trainer`'s callbacks, start state and
    all-reduce."""
    loop = LoopSettings(
        cfg.num_tokens, cfg.checkpoint_every_tokens, cfg.log_every_steps, cfg.grad_clip, "train"
    )
    return Trainer(SAELearner(sae, cfg, world_size), make_optimizer(sae, cfg), loop,
                   world_size=world_size, **kwargs)


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
    """Train `sae` in place on [B, d_in] batches until exactly `cfg.num_tokens` tokens; return
    the state (see `Trainer`)."""
    trainer = sae_trainer(sae, cfg, world_size=world_size, on_metrics=on_metrics,
                          on_checkpoint=on_checkpoint, start_state=start_state,
                          allreduce_grads=allreduce_grads)
    return run_trainer(trainer, batches)


# ---------------------------------------------------------------------------------------------
# FLOPs


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


def sae_flops_per_token(sae: SAE, x_BD: Tensor, cfg: TrainConfig) -> float:
    """FLOPs of one SAE training step per token, counted (not estimated) with torch's
    FlopCounterMode over the forward and backward of a copy of the SAE (the optimiser's
    elementwise update is not a matmul and is not counted, as in the stitching paper)."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(sae)
    with FlopCounterMode(display=False, custom_mapping=_SPARSE_FLOPS) as counter:
        with torch.autocast(x_BD.device.type, torch.bfloat16, enabled=cfg.autocast_bf16):
            out = probe.train_forward(x_BD, 1.0)
        out.loss.backward()
    return counter.get_total_flops() / x_BD.shape[0]
