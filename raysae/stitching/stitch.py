"""Model stitching: affine maps between the residual streams of a small model A and a large B.

Row-vector convention throughout (activations are rows): the up map T↑(a) = a P↑ + b↑ takes
A's d_A-wide stream to B's d_B-wide one, the down map T↓(b) = b P↓ + b↓ goes back. Both are fit
jointly on activations of the same tokens with the paper's loss

    MSE(T↑A, B) + MSE(T↓B, A) + α MSE(T↓T↑A, A) + α MSE(T↑T↓B, B)

(MSE = mean over tokens and dimensions), starting from the closed-form least-squares fit of
each map (`Lstsq`, also the baseline) or from random maps with zero biases. What a stitch carries
across, in closed form: an SAE of A becomes an SAE of B (`transfer_sae`), a linear probe on A
reads B (`map_probe`), a steering vector of A steers B (`map_steering`).

Pure torch: no ray, no mlflow. Stitches are saved as safetensors plus a JSON config.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from raysae import metrics
from raysae.sae import SAE, write_folder_atomically
from raysae.train import (
    load_optimizer_tensors,
    load_state_folder,
    optimizer_tensors,
    save_state_folder,
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
    """Both maps fit independently by least squares on (a, b) batches of the same tokens."""
    up, down = Lstsq(d_a, d_b), Lstsq(d_b, d_a)
    for a_NA, b_NB in pairs:
        up.update(a_NA, b_NB)
        down.update(b_NB, a_NA)
    return Stitch(d_a, d_b, meta=meta).set_maps(*up.solve(), *down.solve())


# ---------------------------------------------------------------------------------------------
# What a stitch carries across


@torch.no_grad()
def transfer_sae(sae: SAE, stitch: Stitch) -> SAE:
    """An SAE of A as an SAE of B: encode T↓(b) with A's encoder, decode through T↑.

    The paper's closed form W_e' = P↓ W_e, b_e' = b↓ W_e + b_e, W_d' = W_d P↑,
    b_d' = b_d P↑ + b↑, adjusted for this SAE's encoder, which subtracts b_dec from its input:
    the encoder bias also absorbs b_d W_e - b_d' W_e' so that exactly
    transferred.encode(b) == sae.encode(T↓ b) and transferred.decode(f) == T↑(sae.decode(f)).
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
    if sae.cfg.architecture == "jumprelu":
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
# Training: Adam, linear warm-up then cosine decay, exact token budget, resumable


@dataclass(frozen=True)
class StitchTrainSettings:
    num_tokens: int
    batch_size: int
    lr: float
    alpha: float = 1.0
    grad_clip: float = 1.0
    lr_warmup_frac: float = 0.0
    checkpoint_every_tokens: int = 1 << 62
    log_every_steps: int = 32


@dataclass
class StitchState:
    step: int
    tokens_seen: int
    params: dict[str, Tensor]
    optimizer: dict[str, Tensor]


def cosine_lr(step: int, total: int, s: StitchTrainSettings) -> float:
    """Linear warm-up to the peak over lr_warmup_frac of the steps, then cosine to zero."""
    warmup = round(s.lr_warmup_frac * total)
    if step < warmup:
        return s.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return s.lr * 0.5 * (1 + math.cos(math.pi * progress))


def save_stitch_state(state: StitchState, path: str | Path) -> Path:
    """Write a resumable stitch state (safetensors + JSON), replaced atomically."""
    groups = {"params": state.params, "optimizer": state.optimizer}
    return save_state_folder(path, groups, {"step": state.step, "tokens_seen": state.tokens_seen})


def load_stitch_state(path: str | Path) -> StitchState:
    scalars, g = load_state_folder(path, ("params", "optimizer"))
    return StitchState(int(scalars["step"]), int(scalars["tokens_seen"]), g["params"], g["optimizer"])


def _snapshot(stitch: Stitch, opt: torch.optim.Adam, step: int, tokens: int) -> StitchState:
    params = {k: v.detach().cpu().clone() for k, v in stitch.state_dict().items()}
    return StitchState(step, tokens, params, optimizer_tensors(opt))


def train_stitch(
    stitch: Stitch,
    s: StitchTrainSettings,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[StitchState], None] | None = None,
    start_state: StitchState | None = None,
    allreduce_grads: Callable[[list[Tensor]], None] | None = None,
    world_size: int = 1,
) -> StitchState:
    """Fit `stitch` in place on (a, b) batches until exactly `s.num_tokens` tokens."""
    total = math.ceil(s.num_tokens / s.batch_size)
    opt = torch.optim.Adam(stitch.parameters(), lr=s.lr)
    step, tokens = 0, 0
    if start_state is not None:
        stitch.load_state_dict(start_state.params)
        load_optimizer_tensors(opt, start_state.optimizer)
        step, tokens = start_state.step, start_state.tokens_seen
    it: Iterator[tuple[Tensor, Tensor]] = iter(batches)
    device = stitch.P_up.device
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    window = 0
    while tokens < s.num_tokens:
        try:
            a, b = next(it)
        except StopIteration:
            raise ValueError(
                f"the activation batches ran out {s.num_tokens - tokens} tokens before the "
                "stitch's token budget; cache more tokens or lower stitch.num_tokens"
            ) from None
        rows = -(-(s.num_tokens - tokens) // world_size)
        a, b = a[:rows].to(device).float(), b[:rows].to(device).float()
        lr = cosine_lr(step, total, s)
        for group in opt.param_groups:
            group["lr"] = lr
        out = stitch.loss(a, b, s.alpha)
        out.total.backward()
        params = list(stitch.parameters())
        if allreduce_grads is not None:
            allreduce_grads(params)
        if s.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sums += torch.stack([t.detach() for t in out]).double()
        window += 1
        step, before, tokens = step + 1, tokens, tokens + len(a) * world_size
        if on_metrics is not None and (step % s.log_every_steps == 0 or tokens >= s.num_tokens):
            vals = (sums / window).tolist()
            sums.zero_()
            window = 0
            names = ("loss", "up_mse", "down_mse", "cycle_a_mse", "cycle_b_mse")
            on_metrics(tokens, dict(zip(names, vals)) | {"lr": lr})
        every = s.checkpoint_every_tokens
        if on_checkpoint is not None and (tokens // every > before // every or tokens >= s.num_tokens):
            on_checkpoint(_snapshot(stitch, opt, step, tokens))
    return _snapshot(stitch, opt, step, tokens)


def flops_per_token(stitch: Stitch, a_NA: Tensor, b_NB: Tensor, alpha: float = 1.0) -> float:
    """Training FLOPs per token of the joint loss (forward and backward), counted with
    `torch.utils.flop_counter.FlopCounterMode` on one batch. Four maps run forward (T↑A, T↓B,
    T↓T↑A, T↑T↓B), each 2·d_a·d_b per token; backward takes the four weight gradients and
    the two inner maps' input gradients (the activations need none): 20·d_a·d_b in all."""
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


def stitch_settings(cfg: Any, log_every_steps: int = 32) -> StitchTrainSettings:
    """The training settings of a `StitchConfig`."""
    return StitchTrainSettings(
        num_tokens=cfg.num_tokens,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        alpha=cfg.alpha,
        grad_clip=cfg.grad_clip,
        lr_warmup_frac=cfg.lr_warmup_frac,
        checkpoint_every_tokens=cfg.checkpoint_every_tokens,
        log_every_steps=log_every_steps,
    )
