"""Each SAE architecture's tensor maths, registered against its name in `raysae.architectures`.

An architecture's kernels say how `raysae.sae.SAE` encodes, scores and takes its fused training
forward, which state it adds to the four SAELens tensors, and what it does after an optimiser
step; the SAE calls them and branches on nothing. `register_architecture` adds a spec and its
kernels in one call (a transcoder, say, would be one more entry here). Pure torch: this module
must not import ray or mlflow.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysae import architectures
from raysae.architectures import THRESHOLD_LR, ArchitectureSpec
from raysae.sae_ops import (
    _EncoderBDecGrad,
    _JumpReLU,
    _JumpReLUTrain,
    _ReluTrain,
    _Select,
    _SparseEncode,
    _Step,
    _sum_sq_mean,
)

if TYPE_CHECKING:
    from raysae.config import SAEConfig
    from raysae.sae import SAE

__all__ = ["THRESHOLD_LR", "Kernels", "SAELoadError", "SAEOutput", "TrainOutput", "Weights", "kernels_of",
           "register_architecture", "unregister_architecture"]


class SAELoadError(ValueError):
    """A saved SAE folder is missing, malformed, or does not fit the SAE asked for."""


class SAEOutput(NamedTuple):
    """Everything one forward pass produces; `loss` is what training minimises."""

    recon_BD: Tensor
    """The reconstruction x̂."""
    feats_BF: Tensor
    """Latent activations f(x), dense (zeros except the active latents)."""
    mse: Tensor
    """Mean over tokens of ||x - x̂||²."""
    sparsity: Tensor
    """Mean over tokens of the penalty before its coefficient (0 for topk)."""
    loss: Tensor
    """mse + coefficient · sparsity (matryoshka_batchtopk: the sum of its prefixes' mse)."""
    prefix_recons: tuple[Tensor, ...] = ()
    """matryoshka_batchtopk: the reconstruction of each prefix of the dictionary, the last
    being `recon_BD`; empty for the other architectures."""


class TrainOutput(NamedTuple):
    """The training step's view of a forward pass: no dense latents are materialised."""

    loss: Tensor
    """mse + coefficient · sparsity (the tensor to back-propagate)."""
    mse: Tensor
    """Mean over tokens of ||x - x̂||²."""
    sparsity: Tensor
    """Mean over tokens of the penalty before its coefficient (0 for topk)."""
    fired_F: Tensor
    """Bool per latent: active on at least one token of the batch."""
    auxk_loss: Tensor | None = None
    """The AuxK loss before its coefficient (None when off: no dead mask, or coefficient 0)."""
    prefix_mse: Tensor | None = None
    """matryoshka_batchtopk: [prefixes] mean over tokens of each prefix's ||x - x̂||²."""
    min_active: Tensor | None = None
    """batchtopk, matryoshka_batchtopk: the smallest positive activation the batch kept (what
    `SAE.update_threshold_` averages; inf if none)."""


class Weights(NamedTuple):
    """The four SAELens tensors in the training forward's dtype, and the loss's dtype."""

    W_enc_DF: Tensor
    b_enc_F: Tensor
    W_dec_FD: Tensor
    b_dec_D: Tensor
    loss_dt: torch.dtype


def pre_acts(sae: SAE, x_BD: Tensor) -> Tensor:
    """W_enc^T (x - b_dec) + b_enc, b_dec's encoder-side gradient through `_EncoderBDecGrad`."""
    bias_F = sae.b_enc + _EncoderBDecGrad.apply(sae.b_dec, sae.W_enc.detach())
    return torch.addmm(bias_F, x_BD - sae.b_dec.detach(), sae.W_enc)


class Kernels:
    """ReLU's kernels (f = ReLU(pre), penalty Σ_i f_i ||W_dec_i||); others override what
    differs. Every method takes the SAE it computes for; `x_BD` is [B, d_in] (flattened)."""

    has_threshold = False
    """Whether inference gates each latent at a threshold, saved as SAELens's `threshold`."""
    autocast = True
    """Whether the training forward runs in the autocast dtype under autocast (else in the
    weights' dtype)."""

    def add_state(self, sae: SAE, cfg: SAEConfig, d_sae: int, kw: dict[str, Any]) -> None:
        """Parameters or buffers beyond the four SAELens tensors (`kw`: dtype and device)."""

    def threshold(self, sae: SAE) -> Tensor:
        raise AttributeError(f"a {sae.cfg.architecture} SAE has no threshold")

    def load_threshold(self, sae: SAE, value: Tensor, path: Path) -> None:
        """Set the state behind `threshold` from a saved `threshold` tensor (of file `path`)."""

    def encode(self, sae: SAE, x_BD: Tensor) -> Tensor:
        """Dense latents f(x) [B, d_sae], as at inference."""
        return pre_acts(sae, x_BD).relu_()

    def scored_encode(self, sae: SAE, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """`forward`'s latents (x_BD of any leading shape) and the mean penalty."""
        feats_BF = sae.encode(x_BD)
        return feats_BF, (feats_BF @ sae.W_dec.norm(dim=1)).mean()

    def train_forward(self, sae: SAE, x_BD: Tensor, x_c: Tensor, w: Weights,
                      dead_F: Tensor | None, sparsity_coeff: float | Tensor) -> TrainOutput:
        """The fused training forward (`x_c`: x in the weights' dtype)."""
        recon_BD, sparsity, fired_F = self.fused(sae, x_c, w)
        mse = _sum_sq_mean(recon_BD.to(w.loss_dt) - x_BD.to(w.loss_dt))
        sparsity = sparsity.to(w.loss_dt)
        return TrainOutput(mse + sparsity_coeff * sparsity, mse, sparsity, fired_F)

    def fused(self, sae: SAE, x_c: Tensor, w: Weights) -> tuple[Tensor, Tensor, Tensor]:
        """(recon, sparsity, fired) of a dense architecture's fused autograd function."""
        return _ReluTrain.apply(x_c, w.W_enc_DF, w.b_enc_F, w.W_dec_FD, w.b_dec_D)

    def after_step(self, sae: SAE, out: TrainOutput) -> None:
        """Constraints on the weights after an optimiser step, running estimates."""

    def probe_metrics(self, sae: SAE) -> dict[str, float]:
        """Extra metrics logged at log steps."""
        return {}


class JumpReLUKernels(Kernels):
    """f = pre · H(pre - θ), θ = exp(log_threshold) per latent, penalty λ Σ_i H(pre_i - θ_i)."""

    has_threshold = True
    autocast = False
    """Trains in float32 under autocast, from the float32 inputs and master weights: the
    straight-through window |pre - θ| < ε/2 (ε = 0.001 by default) is finer than bf16 resolves
    near θ (its spacing there is about θ/128), so in bf16 θ's gradient is exactly 0 for θ >= 0.2
    and wrong below it; rounding x or W to bf16 alone moves pre by more than ε."""

    def add_state(self, sae: SAE, cfg: SAEConfig, d_sae: int, kw: dict[str, Any]) -> None:
        sae.log_threshold = nn.Parameter(
            torch.full((d_sae,), math.log(cfg.jumprelu_threshold), **kw)
        )

    def threshold(self, sae: SAE) -> Tensor:
        return sae.log_threshold.exp()

    def load_threshold(self, sae: SAE, value: Tensor, path: Path) -> None:
        sae.copy_checked("log_threshold", value.log(), path)

    def encode(self, sae: SAE, x_BD: Tensor) -> Tensor:
        return _JumpReLU.apply(pre_acts(sae, x_BD), sae.threshold, sae.cfg.jumprelu_bandwidth)

    def scored_encode(self, sae: SAE, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        x_flat, shape = x_BD.reshape(-1, x_BD.shape[-1]), tuple(x_BD.shape[:-1])
        pre_BF = pre_acts(sae, x_flat)
        eps = sae.cfg.jumprelu_bandwidth
        feats_BF = _JumpReLU.apply(pre_BF, sae.threshold, eps)
        sparsity = _Step.apply(pre_BF, sae.threshold, eps).sum(-1).mean()
        return feats_BF.reshape(*shape, sae.d_sae), sparsity

    def fused(self, sae: SAE, x_c: Tensor, w: Weights) -> tuple[Tensor, Tensor, Tensor]:
        return _JumpReLUTrain.apply(x_c, w.W_enc_DF, w.b_enc_F, w.W_dec_FD, w.b_dec_D,
                                    sae.threshold.to(x_c.dtype), sae.cfg.jumprelu_bandwidth)


class TopKKernels(Kernels):
    """The k largest pre-activations per token, after a ReLU; no penalty; unit-norm decoder
    rows; training decodes and back-propagates through the active latents only (AuxK too)."""

    batch = False
    """Select the k·B largest of the batch (BatchTopK) rather than k per token."""

    def encode(self, sae: SAE, x_BD: Tensor) -> Tensor:
        sel = _Select(sae.cfg.k, False, None, 0, sae._cutoff_hint)
        vals_N, latent_N, *_ = _SparseEncode.apply(x_BD, sae.b_dec, sae.W_enc, sae.b_enc, sel)
        vals_BK, idx_BK = vals_N.view(-1, sae.cfg.k), latent_N.view(-1, sae.cfg.k)
        return vals_BK.new_zeros(x_BD.shape[0], sae.d_sae).scatter(1, idx_BK, vals_BK)

    def scored_encode(self, sae: SAE, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        feats_BF = sae.encode(x_BD)
        return feats_BF, feats_BF.new_zeros(())

    def train_forward(self, sae: SAE, x_BD: Tensor, x_c: Tensor, w: Weights,
                      dead_F: Tensor | None, sparsity_coeff: float | Tensor) -> TrainOutput:
        cfg, D = sae.cfg, x_c.shape[1]
        k_aux = max(1, D // 2) if dead_F is not None and cfg.aux_coefficient > 0 else 0
        sel = _Select(cfg.k, self.batch, dead_F, k_aux, sae._cutoff_hint)
        vals_N, latent_N, token_N, offsets_B, aux_vals_BA, aux_latent_BA = _SparseEncode.apply(
            x_c, w.b_dec_D, w.W_enc_DF, w.b_enc_F, sel
        )
        x_BD = x_BD.to(w.loss_dt)
        recon_BD, mse, loss, prefix_mse = _sparse_decode(sae, x_BD, w, vals_N, latent_N,
                                                         token_N, offsets_B)
        auxk = None
        if k_aux:
            auxk = loss.new_zeros(())
            A = aux_latent_BA.shape[1]
            if A:
                # the dead latents decode the residual (without b_dec, which it already holds);
                # fewer dead latents than k_aux weigh in proportionally less (SAELens's scale)
                err_BD = (x_BD - recon_BD.to(w.loss_dt)).detach()
                ehat_BD = F.embedding_bag(aux_latent_BA, w.W_dec_FD,
                                          per_sample_weights=aux_vals_BA, mode="sum")
                auxk = (A / k_aux) * _sum_sq_mean(ehat_BD.to(w.loss_dt) - err_BD)
            loss = loss + cfg.aux_coefficient * auxk
        hits_F = vals_N.new_zeros(sae.d_sae, dtype=torch.float32)
        hits_F.index_add_(0, latent_N, (vals_N > 0).float())
        return TrainOutput(loss, mse, loss.new_zeros(()), hits_F > 0, auxk, prefix_mse,
                           self.min_active(vals_N))

    def min_active(self, vals_N: Tensor) -> Tensor | None:
        """What `after_step` needs of the kept activations (nothing for TopK)."""
        return None

    def after_step(self, sae: SAE, out: TrainOutput) -> None:
        sae.normalize_decoder_()


def _sparse_decode(
    sae: SAE, x_BD: Tensor, w: Weights, vals_N: Tensor, latent_N: Tensor, token_N: Tensor,
    offsets_B: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(recon, mse, loss, prefix_mse) of the k architectures' kept entries (in token order)."""
    B, D = x_BD.shape
    if len(sae.widths) == 1:
        # a bag-sum of each token's active decoder rows: N·D work, not B·d_sae·D
        recon_BD = F.embedding_bag(latent_N, w.W_dec_FD, offsets_B, per_sample_weights=vals_N,
                                   mode="sum") + w.b_dec_D
        mse = _sum_sq_mean(recon_BD.to(w.loss_dt) - x_BD)
        return recon_BD, mse, mse, None
    # one bag per (token, prefix group): entries are in token order, then latent order, so
    # the bags are too; a cumulative sum over the groups gives every prefix
    P = len(sae.widths)
    bounds = torch.tensor(sae.widths[:-1], device=latent_N.device)
    bag_N = token_N * P + torch.bucketize(latent_N, bounds, right=True)
    offsets = torch.searchsorted(bag_N, torch.arange(B * P, device=bag_N.device))
    parts = F.embedding_bag(latent_N, w.W_dec_FD, offsets, per_sample_weights=vals_N, mode="sum")
    prefix_BPD = parts.view(B, P, D).cumsum(1) + w.b_dec_D
    recon_BD = prefix_BPD[:, -1]
    prefix_mse = (prefix_BPD.to(w.loss_dt) - x_BD[:, None]).pow(2).sum((0, 2)) / B
    return recon_BD, prefix_mse[-1], prefix_mse.sum(), prefix_mse


class BatchTopKKernels(TopKKernels):
    """In training the k·B largest pre-activations of a batch; at inference one threshold θ for
    every latent, a running average of the smallest activation training kept. Serves
    matryoshka_batchtopk too (its prefixes come from `SAE.widths`)."""

    batch = True
    has_threshold = True

    def add_state(self, sae: SAE, cfg: SAEConfig, d_sae: int, kw: dict[str, Any]) -> None:
        # float32 whatever the SAE's dtype (a running average in bf16 stalls); -1 until the
        # first training batch sets it
        sae.register_buffer("topk_threshold", torch.tensor(-1.0, device=kw["device"]))

    def threshold(self, sae: SAE) -> Tensor:
        return sae.topk_threshold.clamp_min(0).to(sae.W_enc.dtype).expand(sae.d_sae)

    def load_threshold(self, sae: SAE, value: Tensor, path: Path) -> None:
        if value.numel() != sae.d_sae or not bool((value == value.flatten()[0]).all()):
            raise SAELoadError(
                f"{path}: a {sae.cfg.architecture} SAE has one threshold for every latent; "
                f"tensor threshold holds differing values"
            )
        sae.topk_threshold.copy_(value.flatten()[0])

    def encode(self, sae: SAE, x_BD: Tensor) -> Tensor:
        pre_BF = pre_acts(sae, x_BD)
        return pre_BF * (pre_BF > sae.threshold)

    def min_active(self, vals_N: Tensor) -> Tensor | None:
        v = vals_N.detach()
        return torch.where(v > 0, v, torch.inf).min().float()

    def after_step(self, sae: SAE, out: TrainOutput) -> None:
        sae.normalize_decoder_()
        assert out.min_active is not None
        update_threshold_(sae.topk_threshold, out.min_active)

    def probe_metrics(self, sae: SAE) -> dict[str, float]:
        return {"threshold": float(sae.threshold[0])}  # the one threshold `l0` was gated at


@torch.no_grad()
def update_threshold_(th: Tensor, min_active: Tensor) -> None:
    """Move a running threshold towards a batch's smallest kept activation (an exponential
    running average at rate THRESHOLD_LR; the first batch sets it; a batch that kept none
    leaves it). On the device: no host sync."""
    t = min_active.to(th.dtype)
    new = torch.where(th < 0, t, th + THRESHOLD_LR * (t - th))
    th.copy_(torch.where(torch.isfinite(t), new, th))


KERNELS: dict[str, Kernels] = {
    "relu": Kernels(), "topk": TopKKernels(), "jumprelu": JumpReLUKernels(),
    "batchtopk": BatchTopKKernels(), "matryoshka_batchtopk": BatchTopKKernels(),
}
"""Every architecture's kernels, by the name of its spec."""


def kernels_of(name: str) -> Kernels:
    """The kernels of a registered architecture."""
    architectures.spec_of(name)  # an unknown name: the KeyError naming the known ones
    if name not in KERNELS:
        raise KeyError(f"architecture {name!r} has a spec but no kernels; register_architecture "
                       f"registers both")
    return KERNELS[name]


def register_architecture(spec: ArchitectureSpec, kernels: Kernels) -> None:
    """Add an architecture: its spec (`raysae.architectures`) and its kernels."""
    if spec.name in KERNELS:
        raise ValueError(f"architecture {spec.name!r} is already registered")
    architectures.register(spec)
    KERNELS[spec.name] = kernels


def unregister_architecture(name: str) -> None:
    """Remove an architecture added by `register_architecture` (for tests)."""
    architectures.unregister(name)
    del KERNELS[name]
