"""Model stitching: affine maps between the residual streams of a small model A and a large B.

Row-vector convention throughout (activations are rows): the up map T↑(a) = a P↑ + b↑ takes
A's d_A-wide stream to B's d_B-wide one, the down map T↓(b) = b P↓ + b↓ goes back. Both are fit
jointly on activations of the same tokens with the paper's loss

    MSE(T↑A, B) + MSE(T↓B, A) + α MSE(T↓T↑A, A) + α MSE(T↑T↓B, B)

(MSE = mean over tokens and dimensions), starting from the closed-form least-squares fit of
each map (`Lstsq`, also the baseline) or from random maps with zero biases. What a stitch carries
across, in closed form: an SAE of A becomes an SAE of B (`transfer_sae`), a linear probe on A
reads B (`map_probe`), a steering vector of A steers B (`map_steering`). `train_stitch` fits
the maps with Adam on the training loop SAEs share (`raysae.train.Trainer`).

Pure torch: no ray, no mlflow. Stitches are saved as safetensors plus a JSON config.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from raysae import metrics
from raysae.checkpoint import TrainState, write_folder_atomically
from raysae.config import StitchConfig
from raysae.sae import SAE
from raysae.train import (
    AllReduceFn,
    CheckpointFn,
    LogPoint,
    LoopSettings,
    Means,
    MetricsFn,
    StepOutput,
    Trainer,
    run_trainer,
    total_steps,
)

WEIGHTS_FILE = "stitch.safetensors"
CONFIG_FILE = "stitch.json"


class StitchLoss(NamedTuple):
    total: Tensor
    up: Tensor
    """MSE(T↑A, B)."""
    down: Tensor
    """MSE(T↓B, A)."""
    cycle_a: Tensor
    """MSE(T↓T↑A, A)."""
    cycle_b: Tensor
    """MSE(T↑T↓B, B)."""


class Stitch(nn.Module):
    """The pair of affine maps between A's d_A-wide and B's d_B-wide activations."""

    def __init__(
        self,
        d_a: int,
        d_b: int,
        *,
        seed: int = 0,
        meta: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Random maps (N(0, 1/d_in) entries) and zero biases, as in the paper."""
        super().__init__()
        if d_a < 1 or d_b < 1:
            raise ValueError(f"stitch widths must be positive, got d_a={d_a}, d_b={d_b}")
        gen = torch.Generator().manual_seed(seed)
        self.P_up = nn.Parameter((torch.randn(d_a, d_b, generator=gen) / math.sqrt(d_a)).to(device))
        self.b_up = nn.Parameter(torch.zeros(d_b, device=device))
        self.P_down = nn.Parameter(
            (torch.randn(d_b, d_a, generator=gen) / math.sqrt(d_b)).to(device)
        )
        self.b_down = nn.Parameter(torch.zeros(d_a, device=device))
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def d_a(self) -> int:
        return self.P_up.shape[0]

    @property
    def d_b(self) -> int:
        return self.P_up.shape[1]

    def up(self, a_ND: Tensor) -> Tensor:
        """T↑(a) = a P↑ + b↑ (any leading dims)."""
        return a_ND @ self.P_up + self.b_up

    def down(self, b_ND: Tensor) -> Tensor:
        """T↓(b) = b P↓ + b↓ (any leading dims)."""
        return b_ND @ self.P_down + self.b_down

    def loss(self, a_NA: Tensor, b_NB: Tensor, alpha: float) -> StitchLoss:
        """The joint loss on activations of the same tokens."""
        up_NB, down_NA = self.up(a_NA), self.down(b_NB)
        mse = nn.functional.mse_loss
        terms = (
            mse(up_NB, b_NB),
            mse(down_NA, a_NA),
            mse(self.down(up_NB), a_NA),
            mse(self.up(down_NA), b_NB),
        )
        total = terms[0] + terms[1] + alpha * (terms[2] + terms[3])
        return StitchLoss(total, *terms)

    @torch.no_grad()
    def set_maps(self, P_up: Tensor, b_up: Tensor, P_down: Tensor, b_down: Tensor) -> Stitch:
        """Overwrite both maps (shapes must match); returns self."""
        for param, value in zip(self.parameters(), (P_up, b_up, P_down, b_down)):
            if param.shape != value.shape:
                raise ValueError(f"stitch map shape {tuple(value.shape)}, expected {tuple(param.shape)}")
            param.copy_(value)
        return self

    def save(self, path: str | Path) -> Path:
        """A folder with `stitch.safetensors` and `stitch.json`; replaced atomically."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        config = {"d_a": self.d_a, "d_b": self.d_b, "convention": "row", **self.meta}

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))

        return write_folder_atomically(path, write)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> Stitch:
        """Read a folder written by `save` (JSON + safetensors only; nothing is unpickled)."""
        path = Path(path)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path}: no {name}; not a stitch folder")
        config = json.loads((path / CONFIG_FILE).read_text())
        tensors = load_file(str(path / WEIGHTS_FILE))
        meta = {k: v for k, v in config.items() if k not in ("d_a", "d_b", "convention")}
        stitch = cls(int(config["d_a"]), int(config["d_b"]), meta=meta, device=device)
        missing = sorted({"P_up", "b_up", "P_down", "b_down"} - set(tensors))
        if missing:
            raise ValueError(f"{path / WEIGHTS_FILE}: missing tensors {missing}")
        return stitch.set_maps(*(tensors[k].to(device) for k in ("P_up", "b_up", "P_down", "b_down")))


# ---------------------------------------------------------------------------------------------
# Closed form: least squares, accumulated over batches in float64


class Lstsq:
    """Streaming least squares y ≈ x P + b from the sufficient statistics Σx, Σy, Σxᵀx, Σxᵀy."""

    def __init__(self, d_x: int, d_y: int, ridge: float = 1e-8) -> None:
        self.n = 0
        self.sx = torch.zeros(d_x, dtype=torch.float64)
        self.sy = torch.zeros(d_y, dtype=torch.float64)
        self.xx = torch.zeros(d_x, d_x, dtype=torch.float64)
        self.xy = torch.zeros(d_x, d_y, dtype=torch.float64)
        self.ridge = ridge

    def update(self, x_ND: Tensor, y_NE: Tensor) -> None:
        x, y = x_ND.detach().cpu().double(), y_NE.detach().cpu().double()
        self.n += len(x)
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xx += x.T @ x
        self.xy += x.T @ y

    def solve(self) -> tuple[Tensor, Tensor]:
        """(P, b) in float32: centred normal equations with a ridge relative to the trace."""
        if self.n < 2:
            raise ValueError("least squares needs at least two rows")
        mx, my = self.sx / self.n, self.sy / self.n
        cov_xx = self.xx / self.n - torch.outer(mx, mx)
        cov_xy = self.xy / self.n - torch.outer(mx, my)
        eye = torch.eye(len(mx), dtype=torch.float64)
        lam = self.ridge * cov_xx.diagonal().mean().clamp_min(1e-30)
        P = torch.linalg.solve(cov_xx + lam * eye, cov_xy)
        return P.float(), (my - mx @ P).float()


def lstsq_stitch(pairs: Iterable[tuple[Tensor, Tensor]], d_a: int, d_b: int, **meta: Any) -> Stitch:
    """Both maps fit independently by least squares on (a, b) batches of the same tokens; the
    stitch's meta records the rows fitted on (`lstsq_rows`, what `lstsq_flops` counts)."""
    up, down = Lstsq(d_a, d_b), Lstsq(d_b, d_a)
    for a_NA, b_NB in pairs:
        up.update(a_NA, b_NB)
        down.update(b_NB, a_NA)
    meta = {**meta, "lstsq_rows": up.n}
    return Stitch(d_a, d_b, meta=meta).set_maps(*up.solve(), *down.solve())


def lstsq_flops(rows: int, d_a: int, d_b: int) -> float:
    """FLOPs of `lstsq_stitch` on `rows` token pairs, counted like the training FLOPs (matmul
    multiply-adds as 2): per row, each map's Gram and cross products xᵀx and xᵀy, 2(d_a² + d_a·d_b)
    for the up map and 2(d_b² + d_a·d_b) for the down map, i.e. 2(d_a + d_b)²; then per map one
    LU factorisation of its d_x × d_x system, (2/3)·d_x³, and the two triangular solves of its
    d_y right-hand sides, 2·d_x²·d_y. Running sums, centring and the ridge (O(rows·d + d²)) are
    not counted, as FlopCounterMode counts no elementwise work either."""
    def solve(d_x: int, d_y: int) -> float:
        return 2.0 * d_x**3 / 3 + 2.0 * d_x * d_x * d_y

    return 2.0 * rows * (d_a + d_b) ** 2 + solve(d_a, d_b) + solve(d_b, d_a)


# ---------------------------------------------------------------------------------------------
# What a stitch carries across


@torch.no_grad()
def transfer_sae(sae: SAE, stitch: Stitch) -> SAE:
    """An SAE of A as an SAE of B: encode T↓(b) with A's encoder, decode through T↑.

    The paper's closed form W_e' = P↓ W_e, b_e' = b↓ W_e + b_e, W_d' = W_d P↑,
    b_d' = b_d P↑ + b↑, adjusted for this SAE's encoder, which subtracts b_dec from its input:
    the encoder bias also absorbs b_d W_e - b_d' W_e' so that exactly
    transferred.encode(b) == sae.encode(T↓ b) and transferred.decode(f) == T↑(sae.decode(f)).

    The transferred encoder computes A's pre-activations of T↓(b) themselves, so every rule that
    reads pre-activations carries over unchanged: a JumpReLU threshold per latent, the one
    BatchTopK threshold θ (inference), TopK's k per token and BatchTopK's k·B per batch
    (training: a batch of B's tokens keeps the latents A's SAE keeps on the mapped batch), and
    the Matryoshka prefixes (W_d P↑ keeps the latents' order). The rows of W_d P↑ are not unit
    norm; fine-tuning a k architecture renormalises them at its first step (as for TopK), which
    moves the reconstructions but neither the pre-activations nor the threshold.
    """
    if sae.d_in != stitch.d_a:
        raise ValueError(f"SAE d_in {sae.d_in} does not match the stitch's d_a {stitch.d_a}")
    P_down, b_down = stitch.P_down.float().cpu(), stitch.b_down.float().cpu()
    P_up, b_up = stitch.P_up.float().cpu(), stitch.b_up.float().cpu()
    W_enc, b_enc = sae.W_enc.float().cpu(), sae.b_enc.float().cpu()
    W_dec, b_dec = sae.W_dec.float().cpu(), sae.b_dec.float().cpu()
    W_enc_new = P_down @ W_enc
    b_dec_new = b_dec @ P_up + b_up
    b_enc_new = b_down @ W_enc + b_enc - b_dec @ W_enc + b_dec_new @ W_enc_new
    meta = sae.metadata
    cfg = dataclasses.replace(sae.cfg, d_sae=sae.d_sae)
    out = SAE(cfg, stitch.d_b, metadata=meta, dtype=torch.float32)
    tensors = {"W_enc": W_enc_new, "b_enc": b_enc_new, "W_dec": W_dec @ P_up, "b_dec": b_dec_new}
    if sae.has_threshold:
        tensors["threshold"] = sae.threshold.float().cpu()
    out._load_tensors(tensors, Path("<transfer_sae>"))
    return out


def map_probe(W_AK: Tensor, b_K: Tensor, stitch: Stitch) -> tuple[Tensor, Tensor]:
    """A linear readout a W + c of A, read on B through T↓: (P↓ W, b↓ W + c)."""
    W = W_AK.to(stitch.P_down)
    return stitch.P_down.detach() @ W, stitch.b_down.detach() @ W + b_K.to(W)


def map_steering(v_A: Tensor, stitch: Stitch) -> Tensor:
    """A steering direction of A in B: v P↑ (a difference has no bias), unit norm."""
    v_B = v_A.to(stitch.P_up) @ stitch.P_up.detach()
    return v_B / v_B.norm().clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------
# Training: Adam, linear warm-up then cosine decay, on the shared loop (`raysae.train`)

_LOSS_METRICS = ("loss", "up_mse", "down_mse", "cycle_a_mse", "cycle_b_mse")
"""The logged names of the `StitchLoss` terms, in order."""


def cosine_lr(step: int, total: int, cfg: StitchConfig) -> float:
    """Linear warm-up to the peak over lr_warmup_frac of the steps, then cosine to zero."""
    warmup = round(cfg.lr_warmup_frac * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


class StitchLearner:
    """A stitch as a `raysae.train.Learner`: (a, b) batches of the same tokens, the joint loss."""

    def __init__(self, stitch: Stitch, cfg: StitchConfig) -> None:
        self.model, self.cfg, self.total = stitch, cfg, total_steps(cfg)
        self.counters: dict[str, Tensor] = {}

    def lr(self, step: int) -> float:
        return cosine_lr(step, self.total, self.cfg)

    def prepare(self, raw: tuple[Tensor, Tensor], rows: int) -> tuple[tuple[Tensor, Tensor], int]:
        device = self.model.P_up.device
        a_NA, b_NB = (x[:rows].to(device).float() for x in raw)
        return (a_NA, b_NB), len(a_NA)

    def loss(self, batch: tuple[Tensor, Tensor], step: int) -> StepOutput:
        out = self.model.loss(*batch, self.cfg.alpha)
        window = {name: t.detach().double() for name, t in zip(_LOSS_METRICS, out)}
        return StepOutput(out.total, window, out)

    def after_step(self, batch: tuple[Tensor, Tensor], out: StepOutput) -> None:
        pass

    def probe(self, batch: tuple[Tensor, Tensor]) -> dict[str, float]:
        return {}

    def report(self, means: Means, at: LogPoint) -> dict[str, float]:
        return dict(means) | {"lr": at.lr}


def stitch_trainer(stitch: Stitch, cfg: StitchConfig, *, log_every_steps: int = 32,
                   world_size: int = 1, **kwargs: Any) -> Trainer:
    """The loop for one stitch; `kwargs` are the `Trainer`'s callbacks, start state and
    all-reduce."""
    loop = LoopSettings(
        cfg.num_tokens, cfg.checkpoint_every_tokens, log_every_steps, cfg.grad_clip, "stitch"
    )
    opt = torch.optim.Adam(stitch.parameters(), lr=cfg.lr)
    return Trainer(StitchLearner(stitch, cfg), opt, loop, world_size=world_size, **kwargs)


def train_stitch(
    stitch: Stitch,
    cfg: StitchConfig,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    log_every_steps: int = 32,
    on_metrics: MetricsFn | None = None,
    on_checkpoint: CheckpointFn | None = None,
    start_state: TrainState | None = None,
    allreduce_grads: AllReduceFn | None = None,
    world_size: int = 1,
) -> TrainState:
    """Fit `stitch` in place on (a, b) batches until exactly `cfg.num_tokens` tokens; return
    the state (see `raysae.train.Trainer`)."""
    trainer = stitch_trainer(stitch, cfg, log_every_steps=log_every_steps, world_size=world_size,
                             on_metrics=on_metrics, on_checkpoint=on_checkpoint,
                             start_state=start_state, allreduce_grads=allreduce_grads)
    return run_trainer(trainer, batches)


def stitch_flops_per_token(stitch: Stitch, a_NA: Tensor, b_NB: Tensor, alpha: float = 1.0) -> float:
    """Training FLOPs per token of the joint loss (forward and backward), counted with
    `torch.utils.flop_counter.FlopCounterMode` on one batch. Four maps run forward (T↑A, T↓B,
    T↓T↑A, T↑T↓B), each 2·d_a·d_b per token; backward takes the four weight gradients and
    the two inner maps' input gradients (the activations need none): 20·d_a·d_b in all. Every
    product is dense: a dense implementation counts the same (`flops_dense_equiv` = `flops`).
    The least-squares start is counted apart (`lstsq_flops`)."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = Stitch(stitch.d_a, stitch.d_b, device=stitch.P_up.device)
    probe.load_state_dict(stitch.state_dict())
    with FlopCounterMode(display=False) as counter:
        probe.loss(a_NA.float(), b_NB.float(), alpha).total.backward()
    return counter.get_total_flops() / len(a_NA)


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def map_quality(stitch: Stitch, a_NA: Tensor, b_NB: Tensor) -> dict[str, float]:
    """MSE and explained variance of each map (and round trip) on held-out activations."""
    a, b = a_NA.float().to(stitch.P_up.device), b_NB.float().to(stitch.P_up.device)
    up, down = stitch.up(a), stitch.down(b)
    out = {}
    for name, x, recon in (
        ("up", b, up),
        ("down", a, down),
        ("round_trip_a", a, stitch.down(up)),
        ("round_trip_b", b, stitch.up(down)),
    ):
        out[f"{name}_mse"] = nn.functional.mse_loss(recon, x).item()
        out[f"{name}_ev"] = metrics.explained_variance(x, recon)
    return out

