"""Sparse autoencoders: one interface, five architectures, saved in SAELens's folder format.

`SAE` holds the SAELens tensors (`W_enc [d_in, d_sae]`, `b_enc`, `W_dec [d_sae, d_in]`, `b_dec`,
plus `log_threshold` for JumpReLU, the `topk_threshold` buffer for BatchTopK) and picks its
activation from `SAEConfig.architecture`:

- `relu`: f = ReLU(W_enc^T (x - b_dec) + b_enc); penalty Σ_i f_i ||W_dec_i|| (SAELens "standard").
- `topk`: the k largest pre-activations, after a ReLU; no penalty; decoder rows kept at unit norm
  by the training loop. Training decodes and back-propagates through the k active latents only.
- `jumprelu`: f = pre · H(pre - θ), θ = exp(log_threshold), penalty λ Σ_i H(pre_i - θ_i) (L0),
  trained with the straight-through rectangle-kernel estimator of Rajamanoharan et al. (2024).
- `batchtopk` (Bussmann et al. 2024): in training, the k·B largest pre-activations of a batch of
  B tokens (after a ReLU), so k per token on average; at inference one threshold θ for every
  latent, f = pre · H(pre - θ), where θ is a running average of the smallest activation training
  kept (`update_threshold_`, SAELens's and dictionary_learning's estimate). Saved, as SAELens
  saves it, as a JumpReLU SAE whose thresholds all equal θ. Decoder rows at unit norm.
- `matryoshka_batchtopk` (Bussmann et al. 2025): batchtopk whose every prefix of the dictionary
  (`SAEConfig.matryoshka_widths`) reconstructs the input on its own; the loss is the sum of the
  prefixes' losses, and `SAEOutput.prefix_recons` gives every prefix's reconstruction.

The k architectures (topk and the two above) may add the AuxK loss (Gao et al. 2024; weight
`SAEConfig.aux_coefficient`): per token, the d_in/2 largest pre-activations of the dead latents
(a mask the training loop passes) decode, without b_dec, the residual x - x̂, the squared error
scaled by min(dead / (d_in/2), 1) as in SAELens.

The loss is ||x - x̂||² summed over d_in and averaged over tokens, plus the coefficient times the
penalty averaged over tokens, on activations as they are (no rescaling): SAELens's convention,
which the layer-transfer paper's code trained with (SAELens, `normalize_sae_decoder=True`: unit-
norm decoder rows and a penalty λ Σ_i f_i). On unit-norm rows the two penalties are equal, and
Σ_i f_i ||W_dec_i|| does not change when a row is scaled and its latent scaled inversely, so the
paper's λ = 1.0 (Table 2, with lr 3e-5) is raysae's λ = 1.0 unconverted.

A saved folder holds `cfg.json` and `sae_weights.safetensors` and loads with SAELens's
`SAE.load_from_disk`; loading here reads only JSON and safetensors, never pickles. Pure torch:
this module must not import ray or mlflow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from raysae.checkpoint import write_folder_atomically
from raysae.config import ConfigError, SAEConfig, from_dict, to_dict

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"

# raysae's architecture names and the architecture SAELens saves them as (it saves its trained
# BatchTopK SAEs as JumpReLU, naming the training architecture in the metadata).
SAELENS_ARCHITECTURE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu",
                        "batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu"}
_FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
BATCH_ARCHITECTURES = ("batchtopk", "matryoshka_batchtopk")
"""The architectures with one batch-level k in training and a threshold at inference."""
THRESHOLD_LR = 0.01
"""Rate of the running average that estimates a BatchTopK threshold (SAELens's
`topk_threshold_lr`; the first batch sets it outright)."""

# SAELens's LLM metadata keys that raysae fills in.
_METADATA_KEYS = ("model_name", "hook_name", "context_size", "prepend_bos")

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


class SAELoadError(ValueError):
    """A saved SAE folder is missing, malformed, or does not fit the SAE asked for."""



@dataclass(frozen=True)
class SAEMetadata:
    """Where an SAE's inputs came from, written into `cfg.json` (SAELens's `metadata`)."""

    model_name: str | None = None
    """The language model the activations were read from."""
    hook_name: str | None = None
    """The site in TransformerLens form, e.g. `blocks.3.hook_resid_post`."""
    context_size: int | None = None
    """Tokens per sequence the activations were computed with."""
    prepend_bos: bool | None = None
    """Whether those sequences started with BOS."""
    extras: dict[str, Any] = field(default_factory=dict)
    """raysae's own JSON-able facts (layer, site, tokens trained, source SAE, ...)."""


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


# ---------------------------------------------------------------------------------------------
# Autograd pieces


class _EncoderBDecGrad(torch.autograd.Function):
    """A zero vector [d_sae] whose gradient carries the encoder path of b_dec's gradient.

    The encoder sees x - b_dec. Letting autograd differentiate that input costs a full
    [B, d_sae] x [d_sae, d_in] matmul per step (grad of the matmul's input) only to sum it over
    the batch. The same gradient is -W_enc @ Σ_b g_pre[b], a matrix-vector product, and Σ_b g_pre
    is exactly the gradient of the encoder bias, which autograd computes anyway. Adding this zero
    to the bias therefore gives b_dec its exact gradient at the cost of one matvec.
    """

    @staticmethod
    def forward(ctx: Any, b_dec_D: Tensor, W_enc_DF: Tensor) -> Tensor:
        ctx.save_for_backward(W_enc_DF)
        return b_dec_D.new_zeros(W_enc_DF.shape[1])

    @staticmethod
    def backward(ctx: Any, g_F: Tensor) -> tuple[Tensor, None]:
        (W_enc_DF,) = ctx.saved_tensors
        return -(W_enc_DF @ g_F.to(W_enc_DF.dtype)), None


def _embedding_bag_weight_grad(
    idx: Tensor, coef: Tensor, x_BD: Tensor, n: int, offsets_B: Tensor | None = None
) -> Tensor:
    """Σ over entries (b, j) of coef · x[b] added into row idx of an [n, D] zero matrix; the
    entries are idx [B, k] (k per token) or, with `offsets_B`, idx [N] whose token b's entries
    start at offsets[b].

    This is the weight gradient of `embedding_bag(idx, W, offsets, per_sample_weights=coef)` for
    upstream gradient x, which torch computes with a sorted scatter: N·D work instead of a dense
    [n, B] x [B, D] matmul.
    """
    with torch.enable_grad():
        W_nD = torch.zeros(n, x_BD.shape[1], dtype=x_BD.dtype, device=x_BD.device)
        W_nD.requires_grad_(True)
        out_BD = F.embedding_bag(
            idx, W_nD, offsets_B, per_sample_weights=coef.to(x_BD.dtype), mode="sum"
        )
        (grad_nD,) = torch.autograd.grad(out_BD, W_nD, x_BD)
    return grad_nD


class _Select(NamedTuple):
    """Which pre-activations `_SparseEncode` keeps."""

    k: int
    """Per token (topk), or on average over the batch (`batch`)."""
    batch: bool
    """Keep the k·B largest of the whole batch (BatchTopK) rather than k per token."""
    dead_F: Tensor | None
    """AuxK: bool per latent, dead; None for no AuxK entries."""
    k_aux: int
    """AuxK: the dead latents kept per token (fewer if fewer are dead)."""
    hint: list[float | None]
    """A one-item list, read and updated: a cutoff below the batch's k·B-th largest value,
    from the previous batch (speed only: the selection is exact whatever it holds)."""


def _sample_cutoff(pre_BF: Tensor, m: int) -> float | None:
    """A value the m-th largest of `pre_BF` likely exceeds, from whole rows spread over the batch
    (about 2^18 values); None if the sample is too small to tell."""
    B, d_sae = pre_BF.shape
    step = max(1, B // -(-(1 << 18) // d_sae))
    sample = pre_BF[::step].reshape(-1)
    r = -(-m * sample.numel() // pre_BF.numel())
    if r >= sample.numel():
        return None
    return float(sample.kthvalue(sample.numel() - r + 1).values)


def _batch_topk_indices(pre_BF: Tensor, n: int, hint: list[float | None]) -> Tensor:
    """Flat indices of the n largest entries of `pre_BF`, ascending: row-major, so each token's
    entries lie together, in latent order.

    A flat topk of n = k·B out of B·d_sae values is a partial sort of millions, and slow on a
    CPU: there the entries above a cutoff below the n-th largest are listed first (one compare,
    one scan, already in row-major order), and the n largest chosen among those. The cutoff is
    the previous batch's value of rank 1.25·n (`hint`, updated here), else an estimate from a
    sample of rows; one that leaves fewer than n entries is passed over, ultimately for every
    entry, so the result is exact whatever the hint.
    """
    flat = pre_BF.reshape(-1)
    if flat.device.type != "cpu":
        return flat.topk(n, sorted=False).indices.sort().values
    spare = -(-5 * n // 4)
    cands = cut = None
    for guess in (lambda: hint[0], lambda: _sample_cutoff(pre_BF, -(-3 * n // 2)),
                  lambda: _sample_cutoff(pre_BF, 4 * n)):
        cut = guess()
        if cut is not None:
            listed = (flat > cut).nonzero().squeeze(1)
            if listed.numel() >= n:
                cands = listed
                break
    if cands is None:
        hint[0] = None
        return flat.topk(n, sorted=False).indices.sort().values
    vals = flat[cands]
    # next time, a cutoff of rank 1.25·n (or this one, if it left fewer)
    hint[0] = float(vals.kthvalue(vals.numel() - spare + 1).values) if vals.numel() > spare else cut
    keep = torch.zeros(vals.numel(), dtype=torch.bool, device=vals.device)
    keep[vals.topk(n, sorted=False).indices] = True
    return cands[keep]


class _SparseEncode(torch.autograd.Function):
    """The k architectures' training encoder: the pre-activations the selection keeps (after a
    ReLU), with a sparse backward.

    Returns (vals [N], latent [N], token [N], offsets [B], aux_vals [B, A], aux_latent [B, A]):
    the kept entries in token order (token b's start at offsets[b]; N = B·k for topk, k·B for
    batchtopk, spread unevenly over tokens), and the AuxK entries (the A largest dead latents of
    each token, A = 0 without AuxK). Only these entries receive gradient, so the encoder weight
    gradient is a scatter of N + B·A rows (see `_embedding_bag_weight_grad`) rather than a dense
    matmul against a mostly-zero [B, d_sae] gradient.
    """

    @staticmethod
    def forward(
        ctx: Any, x_BD: Tensor, b_dec_D: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, sel: _Select
    ) -> tuple[Tensor, ...]:
        xc_BD = x_BD - b_dec_D
        pre_BF = torch.addmm(b_enc_F, xc_BD, W_enc_DF)
        B, d_sae = pre_BF.shape
        dev = pre_BF.device
        if sel.batch:
            flat_N = _batch_topk_indices(pre_BF, sel.k * B, sel.hint)
            token_N = flat_N.div(d_sae, rounding_mode="floor")
            latent_N = flat_N - token_N * d_sae
            vals_N = pre_BF.reshape(-1)[flat_N]
            offsets_B = torch.searchsorted(token_N, torch.arange(B, device=dev))
        else:
            vals_BK, idx_BK = pre_BF.topk(sel.k, dim=-1, sorted=False)
            vals_N, latent_N = vals_BK.reshape(-1), idx_BK.reshape(-1)
            token_N = torch.arange(B, device=dev).repeat_interleave(sel.k)
            offsets_B = torch.arange(0, B * sel.k, sel.k, device=dev)
        vals_N = vals_N.relu_()
        aux_vals_BA = pre_BF.new_empty(B, 0)
        aux_latent_BA = torch.empty(B, 0, dtype=torch.long, device=dev)
        if sel.dead_F is not None and sel.k_aux > 0:
            # the count of dead latents sets the shapes: one host sync per step with AuxK (as
            # in SAELens and sparsify), none without
            dead_F = sel.dead_F.nonzero().squeeze(1)
            A = min(sel.k_aux, dead_F.numel())
            if A > 0:
                aux_vals_BA, j_BA = pre_BF.index_select(1, dead_F).topk(A, dim=1, sorted=False)
                aux_vals_BA, aux_latent_BA = aux_vals_BA.relu_(), dead_F[j_BA]
        ctx.save_for_backward(xc_BD, W_enc_DF, latent_N, offsets_B, vals_N, aux_latent_BA,
                              aux_vals_BA)
        ctx.mark_non_differentiable(latent_N, token_N, offsets_B, aux_latent_BA)
        ctx.set_materialize_grads(False)
        return vals_N, latent_N, token_N, offsets_B, aux_vals_BA, aux_latent_BA

    @staticmethod
    def backward(ctx: Any, g_N: Tensor | None, *grads: Tensor | None) -> tuple[Any, ...]:
        xc_BD, W_enc_DF, latent_N, offsets_B, vals_N, aux_latent_BA, aux_vals_BA = ctx.saved_tensors
        g_aux_BA = grads[3]
        d_sae = W_enc_DF.shape[1]
        g_b_enc_F = xc_BD.new_zeros(d_sae)
        g_W_FD = None
        if g_N is not None:
            g_N = g_N * (vals_N > 0)
            g_b_enc_F.index_add_(0, latent_N, g_N)
            g_W_FD = _embedding_bag_weight_grad(latent_N, g_N, xc_BD, d_sae, offsets_B)
        if g_aux_BA is not None and aux_latent_BA.numel():
            g_aux_BA = g_aux_BA * (aux_vals_BA > 0)
            g_b_enc_F.index_add_(0, aux_latent_BA.reshape(-1), g_aux_BA.reshape(-1))
            g_aux_FD = _embedding_bag_weight_grad(aux_latent_BA, g_aux_BA, xc_BD, d_sae)
            g_W_FD = g_aux_FD if g_W_FD is None else g_W_FD.add_(g_aux_FD)
        if g_W_FD is None:
            g_W_FD = xc_BD.new_zeros(d_sae, xc_BD.shape[1])
        g_b_dec_D = -(W_enc_DF @ g_b_enc_F.to(W_enc_DF.dtype))
        return None, g_b_dec_D, g_W_FD.t(), g_b_enc_F, None


class _ReluTrain(torch.autograd.Function):
    """The ReLU SAE's training forward with a hand-fused backward.

    Returns (recon [B, D], sparsity = mean_b Σ_i f_bi ||W_dec_i||, fired [F] bool). The step
    is bound by five matmuls; this keeps the rest to a few passes over [B, d_sae]:
    - biases ride along as an extra row of the matmul's inner dimension ([x - b_dec, 1] @
      [W_enc; b_enc]) instead of a broadcast copy into the output, and the matching weight
      gradient row is b_enc's gradient;
    - the L1 term's gradient with respect to f is a constant row (coefficient · norms / B) and
      enters the decoder-backward matmul the same way;
    - the ReLU mask is applied in place (see backward); column sums are matvecs;
    - b_dec's encoder-side gradient is -W_enc @ Σ_b g_pre, not a [B, d_sae] x [d_sae, d_in]
      matmul.
    """

    @staticmethod
    def forward(
        ctx: Any, x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        B, D = x_BD.shape
        xc_BD1 = x_BD.new_empty(B, D + 1)
        torch.sub(x_BD, b_dec_D, out=xc_BD1[:, :D])
        xc_BD1[:, D] = 1.0
        f_BF = (xc_BD1 @ torch.cat([W_enc_DF, b_enc_F[None]])).relu_()
        recon_BD = torch.addmm(b_dec_D, f_BF, W_dec_FD)
        colsum_F = x_BD.new_ones(B) @ f_BF
        norms_F = W_dec_FD.norm(dim=1)
        sparsity = colsum_F @ norms_F / B
        ctx.save_for_backward(xc_BD1, f_BF, W_enc_DF, W_dec_FD, norms_F, colsum_F)
        fired_F = colsum_F > 0  # f >= 0, so a latent fired iff its column sum is positive
        ctx.mark_non_differentiable(fired_F)
        return recon_BD, sparsity, fired_F

    @staticmethod
    def backward(
        ctx: Any, g_recon_BD: Tensor, g_sparsity: Tensor, _g_fired: Any
    ) -> tuple[Any, ...]:
        xc_BD1, f_BF, W_enc_DF, W_dec_FD, norms_F, colsum_F = ctx.saved_tensors
        B, D = g_recon_BD.shape
        g_s = g_sparsity / B
        g_W_dec_FD = f_BF.t() @ g_recon_BD
        g_W_dec_FD += (g_s * colsum_F / norms_F.clamp_min(1e-12))[:, None] * W_dec_FD
        g_b_dec_D = g_recon_BD.sum(0)
        g_BD1 = torch.cat([g_recon_BD, g_recon_BD.new_ones(B, 1)], dim=1)
        # Appending a column to W_dec (then a transposed view) copies rows, not a transpose.
        g_pre_BF = g_BD1 @ torch.cat([W_dec_FD, (g_s * norms_F)[:, None]], dim=1).t()
        # ReLU backward without a [B, d_sae] mask allocation: f is not needed any more, so turn
        # it into its own 0/1 mask in place. A second backward through this graph is then
        # refused by autograd's saved-tensor version check.
        g_pre_BF.mul_(f_BF.sign_())
        g_Wb_enc = xc_BD1.t() @ g_pre_BF  # [D + 1, F]: W_enc's gradient, then b_enc's
        g_b_dec_D -= W_enc_DF @ g_Wb_enc[D]
        return None, g_Wb_enc[:D], g_Wb_enc[D], g_W_dec_FD, g_b_dec_D


class _JumpReLUTrain(torch.autograd.Function):
    """The JumpReLU SAE's training forward with a hand-fused backward.

    Returns (recon [B, D], sparsity = mean_b Σ_i H(pre_bi - θ_i), fired [F] bool): the values
    of the plain forward (`_JumpReLU` then `_Step`) with the same straight-through gradients,
    θ's being -(1/ε) Σ_b K((pre - θ)/ε) (θ g_f + g_sparsity / B) from the two terms together.
    Plain autograd spends as long as the five matmuls on passes over [B, d_sae] (masks, two
    rectangle windows, their products, sums, a fresh tensor for each); here:
    - the encoder computes q = pre / θ (θ folded into its weights and bias, which ride along as
      an extra row as in `_ReluTrain`), so the gate is the scalar `threshold_(q, 1, 0)` in
      place, and the decoder takes θ ⊙ W_dec: q·H(q - 1) @ (θ ⊙ W_dec) = f @ W_dec;
    - the window |pre - θ| < ε/2 (|q - 1| < ε / 2θ), which holds few entries, is listed once in
      the forward, so θ's gradient is a sum over that list;
    - the gate of the backward is q's own sign, taken in place once q has given the decoder its
      weight gradient (a second backward through this graph is refused, as for `_ReluTrain`).
    """

    @staticmethod
    def forward(
        ctx: Any, x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, W_dec_FD: Tensor,
        b_dec_D: Tensor, theta_F: Tensor, bandwidth: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        B, D = x_BD.shape
        theta_F = theta_F.clamp_min(1e-12)  # exp(log θ) underflowing to 0 would divide by 0
        xc_BD1 = x_BD.new_empty(B, D + 1)
        torch.sub(x_BD, b_dec_D, out=xc_BD1[:, :D])
        xc_BD1[:, D] = 1.0
        q_BF = xc_BD1 @ torch.cat([W_enc_DF, b_enc_F[None]]).div_(theta_F)
        r_F = (bandwidth / 2) / theta_F
        window_BF = q_BF > 1 - r_F
        window_BF &= q_BF < 1 + r_F
        token_M, latent_M = window_BF.nonzero().unbind(1)
        window_BF = q_BF > 1  # now the gate
        sparsity = torch.count_nonzero(window_BF).float() / B  # float32: an exact count
        del window_BF
        torch.nn.functional.threshold_(q_BF, 1.0, 0.0)  # f / θ
        recon_BD = torch.addmm(b_dec_D, q_BF, theta_F[:, None] * W_dec_FD)
        fired_F = (x_BD.new_ones(B) @ q_BF) > 0
        ctx.save_for_backward(xc_BD1, q_BF, W_enc_DF, W_dec_FD, theta_F, token_M, latent_M)
        ctx.bandwidth = bandwidth
        ctx.mark_non_differentiable(fired_F)
        return recon_BD, sparsity, fired_F

    @staticmethod
    def backward(
        ctx: Any, g_recon_BD: Tensor, g_sparsity: Tensor, _g_fired: Any
    ) -> tuple[Any, ...]:
        xc_BD1, q_BF, W_enc_DF, W_dec_FD, theta_F, token_M, latent_M = ctx.saved_tensors
        B, D = g_recon_BD.shape
        g_W_dec_FD = (q_BF.t() @ g_recon_BD).mul_(theta_F[:, None])  # f = θ q
        g_b_dec_D = g_recon_BD.sum(0)
        g_f_BF = g_recon_BD @ W_dec_FD.t()
        g_M = theta_F[latent_M] * g_f_BF[token_M, latent_M] + g_sparsity / B
        g_theta_F = torch.zeros_like(theta_F).index_add_(0, latent_M, g_M.to(theta_F.dtype))
        g_theta_F *= -1.0 / ctx.bandwidth
        g_f_BF.mul_(q_BF.sign_())  # the gate, from q itself (q is not needed any more)
        g_Wb_enc = xc_BD1.t() @ g_f_BF  # [D + 1, F]: W_enc's gradient, then b_enc's
        g_b_dec_D -= W_enc_DF @ g_Wb_enc[D]
        return None, g_Wb_enc[:D], g_Wb_enc[D], g_W_dec_FD, g_b_dec_D, g_theta_F, None


def _rectangle(z: Tensor) -> Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre · H(pre - θ); θ receives the straight-through gradient -(θ/ε) K((pre - θ)/ε)."""

    @staticmethod
    def forward(ctx: Any, pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.bandwidth = bandwidth
        return pre_BF * (pre_BF > theta_F)

    @staticmethod
    def backward(ctx: Any, g_BF: Tensor) -> tuple[Tensor, Tensor, None]:
        pre_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        g_pre = g_BF * (pre_BF > theta_F)
        g_theta = (-(theta_F / eps) * _rectangle((pre_BF - theta_F) / eps) * g_BF).sum(0)
        return g_pre, g_theta, None


class _Step(torch.autograd.Function):
    """H(pre - θ); θ receives the straight-through gradient -(1/ε) K((pre - θ)/ε)."""

    @staticmethod
    def forward(ctx: Any, pre_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.bandwidth = bandwidth
        return (pre_BF > theta_F).to(pre_BF.dtype)

    @staticmethod
    def backward(ctx: Any, g_BF: Tensor) -> tuple[None, Tensor, None]:
        pre_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        g_theta = (-(1.0 / eps) * _rectangle((pre_BF - theta_F) / eps) * g_BF).sum(0)
        return None, g_theta, None


# ---------------------------------------------------------------------------------------------
# The SAE


def geometric_median(points_ND: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """The point minimising the summed Euclidean distance to `points_ND` (Weiszfeld, float64)."""
    pts = points_ND.detach().to(torch.float64)
    y_D = pts.mean(0)
    for _ in range(max_iter):
        w_N = 1.0 / (pts - y_D).norm(dim=1).clamp_min(1e-12)
        y_new = (w_N[:, None] * pts).sum(0) / w_N.sum()
        moved = (y_new - y_D).norm().item()
        y_D = y_new
        if moved <= tol * max(y_D.norm().item(), 1.0):
            break
    return y_D.to(points_ND.dtype)


class SAE(nn.Module):
    """A sparse autoencoder on `d_in`-wide activations; see the module docstring."""

    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def __init__(
        self,
        cfg: SAEConfig,
        d_in: int,
        *,
        metadata: SAEMetadata | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        """A scratch SAE: W_dec rows are random unit vectors, W_enc = W_dec^T, biases zero."""
        super().__init__()
        d_sae = cfg.width(d_in)
        if d_in < 1:
            raise ValueError(f"d_in must be positive, got {d_in}")
        if cfg.uses_k and cfg.k > d_sae:
            raise ConfigError(f"sae.k: got {cfg.k}, expected at most d_sae ({d_sae})")
        self.widths = cfg.prefix_widths(d_in)
        self.cfg = cfg
        self.metadata = metadata or SAEMetadata()
        gen = torch.Generator().manual_seed(seed)
        # Random directions drawn on the CPU so a seed gives the same SAE on every device.
        W_dec_FD = torch.randn(d_sae, d_in, generator=gen, dtype=torch.float32)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        kw: dict[str, Any] = dict(dtype=dtype, device=device)
        self.W_dec = nn.Parameter(W_dec_FD.to(**kw))
        self.W_enc = nn.Parameter(W_dec_FD.t().contiguous().to(**kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        if cfg.architecture == "jumprelu":
            self.log_threshold = nn.Parameter(
                torch.full((d_sae,), math.log(cfg.jumprelu_threshold), **kw)
            )
        if cfg.architecture in BATCH_ARCHITECTURES:
            # float32 whatever the SAE's dtype (a running average in bf16 stalls); -1 until the
            # first training batch sets it
            self.register_buffer("topk_threshold", torch.tensor(-1.0, device=device))
        self._cutoff_hint: list[float | None] = [None]

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def has_threshold(self) -> bool:
        """Whether inference gates each latent at a threshold (jumprelu, batchtopk,
        matryoshka_batchtopk), saved as SAELens's `threshold` tensor."""
        return self.cfg.architecture == "jumprelu" or self.cfg.architecture in BATCH_ARCHITECTURES

    @property
    def threshold(self) -> Tensor:
        """θ per latent [d_sae]: exp(log_threshold) (jumprelu), or the one running threshold
        of batchtopk and matryoshka_batchtopk (0, i.e. a ReLU, before any training)."""
        if self.cfg.architecture in BATCH_ARCHITECTURES:
            return self.topk_threshold.clamp_min(0).to(self.W_enc.dtype).expand(self.d_sae)
        return self.log_threshold.exp()

    @torch.no_grad()
    def update_threshold_(self, min_active: Tensor) -> None:
        """Move the batchtopk threshold towards a batch's smallest kept activation (an
        exponential running average at rate THRESHOLD_LR; the first batch sets it; a batch
        that kept none leaves it). On the device: no host sync."""
        th = self.topk_threshold
        t = min_active.to(th.dtype)
        new = torch.where(th < 0, t, th + THRESHOLD_LR * (t - th))
        th.copy_(torch.where(torch.isfinite(t), new, th))

    # -- the maths ----------------------------------------------------------------------------

    def _pre_acts(self, x_BD: Tensor) -> Tensor:
        bias_F = self.b_enc + _EncoderBDecGrad.apply(self.b_dec, self.W_enc.detach())
        return torch.addmm(bias_F, x_BD - self.b_dec.detach(), self.W_enc)

    def _topk(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        sel = _Select(self.cfg.k, False, None, 0, self._cutoff_hint)
        vals_N, latent_N, *_ = _SparseEncode.apply(x_BD, self.b_dec, self.W_enc, self.b_enc, sel)
        return vals_N.view(-1, self.cfg.k), latent_N.view(-1, self.cfg.k)

    def encode(self, x_BD: Tensor) -> Tensor:
        """Latent activations f(x) [.., d_sae] (dense). batchtopk and matryoshka_batchtopk
        encode as at inference (and as SAELens loads them): gated at the threshold, token by
        token; their batch-level selection is training's (`train_forward`)."""
        x_BD, shape = _flatten(x_BD)
        arch = self.cfg.architecture
        if arch == "topk":
            vals_BK, idx_BK = self._topk(x_BD)
            feats_BF = vals_BK.new_zeros(x_BD.shape[0], self.d_sae).scatter(1, idx_BK, vals_BK)
        elif arch in BATCH_ARCHITECTURES:
            pre_BF = self._pre_acts(x_BD)
            feats_BF = pre_BF * (pre_BF > self.threshold)
        elif arch == "jumprelu":
            feats_BF = _JumpReLU.apply(
                self._pre_acts(x_BD), self.threshold, self.cfg.jumprelu_bandwidth
            )
        else:
            feats_BF = self._pre_acts(x_BD).relu_()
        return feats_BF.reshape(*shape, self.d_sae)

    def decode(self, feats_BF: Tensor) -> Tensor:
        """Reconstruction x̂ = f W_dec + b_dec [.., d_in]."""
        f_BF, shape = _flatten(feats_BF)
        return torch.addmm(self.b_dec, f_BF, self.W_dec).reshape(*shape, self.d_in)

    def forward(self, x_BD: Tensor, sparsity_coeff: float | Tensor | None = None) -> SAEOutput:
        """Encode, decode and score a batch [B, d_in]; `sparsity_coeff` defaults to the config's."""
        coeff = self.cfg.l1_coefficient if sparsity_coeff is None else sparsity_coeff
        arch = self.cfg.architecture
        if arch == "jumprelu":
            x_BD, shape = _flatten(x_BD)
            pre_BF = self._pre_acts(x_BD)
            eps = self.cfg.jumprelu_bandwidth
            feats_BF = _JumpReLU.apply(pre_BF, self.threshold, eps)
            sparsity = _Step.apply(pre_BF, self.threshold, eps).sum(-1).mean()
            feats_BF = feats_BF.reshape(*shape, self.d_sae)
            x_BD = x_BD.reshape(*shape, self.d_in)
        else:
            feats_BF = self.encode(x_BD)
            if arch == "relu":
                sparsity = (feats_BF @ self.W_dec.norm(dim=1)).mean()
            else:
                sparsity = feats_BF.new_zeros(())
        if len(self.widths) > 1:
            prefixes = self.decode_prefixes(feats_BF)
            recon_BD = prefixes[-1]
            mses = [_sum_sq_mean(_flatten(r - x_BD)[0]) for r in prefixes]
            return SAEOutput(recon_BD, feats_BF, mses[-1], sparsity, sum(mses), prefixes)
        recon_BD = self.decode(feats_BF)
        mse = _sum_sq_mean(_flatten(recon_BD - x_BD)[0])
        return SAEOutput(recon_BD, feats_BF, mse, sparsity, mse + coeff * sparsity)

    def decode_prefixes(self, feats_BF: Tensor) -> tuple[Tensor, ...]:
        """The reconstruction from each Matryoshka prefix of the latents (the first w latents,
        for each prefix width w), the last being `decode(feats)`: one decode's work in all."""
        f_BF, shape = _flatten(feats_BF)
        out, recon_BD, lo = [], self.b_dec, 0
        for hi in self.widths:
            recon_BD = torch.addmm(recon_BD, f_BF[:, lo:hi], self.W_dec[lo:hi])
            out.append(recon_BD.reshape(*shape, self.d_in))
            lo = hi
        return tuple(out)

    def train_forward(
        self, x_BD: Tensor, sparsity_coeff: float | Tensor, dead_F: Tensor | None = None
    ) -> TrainOutput:
        """The training step's forward: the loss of `forward`, computed at least cost.

        relu, jumprelu and the k architectures run through fused autograd functions (no dense
        latents for the k architectures, whose decode is a bag-sum of the active decoder rows).
        batchtopk and matryoshka_batchtopk select k·B latents over the batch, as in training.
        `dead_F` (bool per latent) turns on the AuxK loss of the k architectures when
        `aux_coefficient` > 0. Under autocast, everything runs in the autocast dtype except the
        loss (at least float32).
        """
        dev = x_BD.device.type
        amp = torch.is_autocast_enabled(dev)
        dt = torch.get_autocast_dtype(dev) if amp else self.W_enc.dtype
        loss_dt = torch.promote_types(dt, torch.float32)
        with torch.autocast(dev, enabled=False):
            x_c = x_BD.to(dt)
            W_enc_DF, b_enc_F, W_dec_FD, b_dec_D = (
                p.to(dt) for p in (self.W_enc, self.b_enc, self.W_dec, self.b_dec)
            )
            arch = self.cfg.architecture
            if self.cfg.uses_k:
                return self._train_forward_k(x_BD, x_c, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D,
                                             dead_F, loss_dt)
            if arch == "relu":
                recon_BD, sparsity, fired_F = _ReluTrain.apply(
                    x_c, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D
                )
            else:
                recon_BD, sparsity, fired_F = _JumpReLUTrain.apply(
                    x_c, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D, self.threshold.to(dt),
                    self.cfg.jumprelu_bandwidth,
                )
            mse = _sum_sq_mean(recon_BD.to(loss_dt) - x_BD.to(loss_dt))
            sparsity = sparsity.to(loss_dt)
        return TrainOutput(mse + sparsity_coeff * sparsity, mse, sparsity, fired_F)

    def _train_forward_k(
        self, x_BD: Tensor, x_c: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, W_dec_FD: Tensor,
        b_dec_D: Tensor, dead_F: Tensor | None, loss_dt: torch.dtype,
    ) -> TrainOutput:
        """`train_forward` of topk, batchtopk and matryoshka_batchtopk."""
        cfg, (B, D) = self.cfg, x_c.shape
        k_aux = max(1, D // 2) if dead_F is not None and cfg.aux_coefficient > 0 else 0
        sel = _Select(cfg.k, cfg.architecture != "topk", dead_F, k_aux, self._cutoff_hint)
        vals_N, latent_N, token_N, offsets_B, aux_vals_BA, aux_latent_BA = _SparseEncode.apply(
            x_c, b_dec_D, W_enc_DF, b_enc_F, sel
        )
        x_BD = x_BD.to(loss_dt)
        prefix_mse = None
        if len(self.widths) == 1:
            # a bag-sum of each token's active decoder rows: N·D work, not B·d_sae·D
            recon_BD = F.embedding_bag(latent_N, W_dec_FD, offsets_B, per_sample_weights=vals_N,
                                       mode="sum") + b_dec_D
            mse = _sum_sq_mean(recon_BD.to(loss_dt) - x_BD)
            loss = mse
        else:
            # one bag per (token, prefix group): entries are in token order, then latent order,
            # so the bags are too; a cumulative sum over the groups gives every prefix
            P = len(self.widths)
            bounds = torch.tensor(self.widths[:-1], device=latent_N.device)
            bag_N = token_N * P + torch.bucketize(latent_N, bounds, right=True)
            offsets = torch.searchsorted(bag_N, torch.arange(B * P, device=bag_N.device))
            parts = F.embedding_bag(latent_N, W_dec_FD, offsets, per_sample_weights=vals_N,
                                    mode="sum")
            prefix_BPD = parts.view(B, P, D).cumsum(1) + b_dec_D
            recon_BD = prefix_BPD[:, -1]
            prefix_mse = (prefix_BPD.to(loss_dt) - x_BD[:, None]).pow(2).sum((0, 2)) / B
            mse, loss = prefix_mse[-1], prefix_mse.sum()
        auxk = None
        if k_aux:
            auxk = loss.new_zeros(())
            A = aux_latent_BA.shape[1]
            if A:
                # the dead latents decode the residual (without b_dec, which it already holds);
                # fewer dead latents than k_aux weigh in proportionally less (SAELens's scale)
                err_BD = (x_BD - recon_BD.to(loss_dt)).detach()
                ehat_BD = F.embedding_bag(aux_latent_BA, W_dec_FD, per_sample_weights=aux_vals_BA,
                                          mode="sum")
                auxk = (A / k_aux) * _sum_sq_mean(ehat_BD.to(loss_dt) - err_BD)
            loss = loss + cfg.aux_coefficient * auxk
        hits_F = vals_N.new_zeros(self.d_sae, dtype=torch.float32)
        hits_F.index_add_(0, latent_N, (vals_N > 0).float())
        min_active = None
        if cfg.architecture in BATCH_ARCHITECTURES:
            v = vals_N.detach()
            min_active = torch.where(v > 0, v, torch.inf).min().float()
        return TrainOutput(loss, mse, loss.new_zeros(()), hits_F > 0, auxk, prefix_mse,
                           min_active)

    # -- initialisation -----------------------------------------------------------------------

    @torch.no_grad()
    def init_b_dec(self, sample_ND: Tensor, method: str | None = None) -> None:
        """Set b_dec from a data sample: its mean, geometric median, or zeros (config default)."""
        method = method or self.cfg.b_dec_init
        if method == "zeros":
            self.b_dec.zero_()
            return
        sample_ND = sample_ND.reshape(-1, self.d_in)
        if method == "mean":
            value = sample_ND.to(torch.float64).mean(0)
        elif method == "geometric_median":
            value = geometric_median(sample_ND)
        else:
            raise ValueError(
                f"unknown b_dec init {method!r}; expected mean, geometric_median, zeros"
            )
        self.b_dec.copy_(value.to(self.b_dec))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm (done after each step of the k
        architectures)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # -- files --------------------------------------------------------------------------------

    def saelens_cfg(self) -> dict[str, Any]:
        """The `cfg.json` dict, in SAELens 6.x's spelling."""
        meta = self.metadata
        llm = {k: getattr(meta, k) for k in _METADATA_KEYS}
        cfg: dict[str, Any] = {
            "architecture": SAELENS_ARCHITECTURE[self.cfg.architecture],
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": str(self.W_enc.dtype).removeprefix("torch."),
            "device": self.W_enc.device.type,
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
        }
        if self.cfg.architecture == "topk":
            cfg["k"] = self.cfg.k
        training = {}
        if self.cfg.architecture in BATCH_ARCHITECTURES:
            # what SAELens writes for a BatchTopK SAE it saves as JumpReLU (its
            # `training_architecture_details` hold the training config's fields)
            details: dict[str, Any] = {"k": self.cfg.k, "topk_threshold_lr": THRESHOLD_LR,
                                       "aux_loss_coefficient": self.cfg.aux_coefficient,
                                       "rescale_acts_by_decoder_norm": True}
            if self.cfg.architecture == "matryoshka_batchtopk":
                details["matryoshka_widths"] = list(self.widths)
            training = {"training_architecture": self.cfg.architecture,
                        "training_architecture_details": details}
        # No sae_lens_version is claimed, so SAELens reads this through its pre-6.0 path, which
        # rebuilds metadata from top-level keys: mirror them there so they survive that path.
        cfg.update(llm)
        cfg["metadata"] = {**llm, **training, "raysae": {"sae": to_dict(self.cfg), **meta.extras}}
        return cfg

    def save(self, path: str | Path) -> Path:
        """Write `cfg.json` + `sae_weights.safetensors` to folder `path` (atomically replaced)."""
        tensors = {
            name: getattr(self, name).detach().contiguous()
            for name in ("W_enc", "b_enc", "W_dec", "b_dec")
        }
        if self.has_threshold:
            tensors["threshold"] = self.threshold.detach().contiguous()

        def write(tmp: Path) -> None:
            save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILENAME))
            (tmp / CFG_FILENAME).write_text(json.dumps(self.saelens_cfg(), indent=2))

        return write_folder_atomically(path, write)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> SAE:
        """Load a folder written by `save` (or a SAELens standard/topk/jumprelu folder)."""
        path = Path(path)
        saved, tensors = _read_folder(path)
        cfg, metadata = _config_from_saved(saved, path)
        d_in, d_sae = tensors["W_enc"].shape
        if cfg.width(d_in) != d_sae:
            cfg = from_dict(SAEConfig, {**to_dict(cfg), "d_sae": d_sae})
        dtype = _DTYPES.get(str(saved.get("dtype", "float32")), tensors["W_enc"].dtype)
        sae = cls(cfg, d_in, metadata=metadata, dtype=dtype, device=device)
        sae._load_tensors(tensors, path)
        return sae

    @classmethod
    def init_from(
        cls,
        path: str | Path,
        cfg: SAEConfig,
        d_in: int,
        *,
        metadata: SAEMetadata | None = None,
        device: torch.device | str | None = None,
    ) -> SAE:
        """A new SAE with config `cfg` whose weights start as the SAE saved at `path`.

        The transfer-learning path (SAE_{i<-j} starts from SAE_j): shapes and architecture
        must match; the training hyperparameters in `cfg` (coefficient, k) may differ.
        """
        path = Path(path)
        saved, tensors = _read_folder(path)
        want = (d_in, cfg.width(d_in))
        have = tuple(tensors["W_enc"].shape)
        if have != want:
            raise SAELoadError(
                f"cannot initialise an SAE with (d_in, d_sae) = {want} from {path}: the saved "
                f"SAE has (d_in, d_sae) = {have} (W_enc shape [{have[0]}, {have[1]}], "
                f"expected [{want[0]}, {want[1]}])"
            )
        saved_arch = _saved_architecture(saved)
        if saved_arch != cfg.architecture:
            raise SAELoadError(
                f"cannot initialise a {cfg.architecture} SAE from {path}: it holds a "
                f"{saved.get('architecture')!r} SAE"
            )
        dtype = tensors["W_enc"].dtype
        sae = cls(cfg, d_in, metadata=metadata, dtype=dtype, device=device)
        sae._load_tensors(tensors, path)
        return sae

    @torch.no_grad()
    def _load_tensors(self, tensors: Mapping[str, Tensor], path: Path) -> None:
        names = ["W_enc", "b_enc", "W_dec", "b_dec"]
        if self.has_threshold:
            names.append("threshold")
        missing = [n for n in names if n not in tensors]
        if missing:
            raise SAELoadError(f"{path / WEIGHTS_FILENAME}: missing tensors {missing}")
        for name in names:
            value = tensors[name]
            if name == "threshold" and self.cfg.architecture in BATCH_ARCHITECTURES:
                if value.numel() != self.d_sae or not bool((value == value.flatten()[0]).all()):
                    raise SAELoadError(
                        f"{path / WEIGHTS_FILENAME}: a {self.cfg.architecture} SAE has one "
                        f"threshold for every latent; tensor threshold holds differing values"
                    )
                self.topk_threshold.copy_(value.flatten()[0])
                continue
            if name == "threshold":
                name, value = "log_threshold", value.log()
            param = getattr(self, name)
            if tuple(value.shape) != tuple(param.shape):
                raise SAELoadError(
                    f"{path / WEIGHTS_FILENAME}: tensor {name} has shape {list(value.shape)}, "
                    f"expected {list(param.shape)}"
                )
            param.copy_(value)


def _read_folder(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    cfg_file, weights_file = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise SAELoadError(f"{path} is not an SAE folder: {f.name} is missing")
    try:
        saved = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise SAELoadError(f"{cfg_file}: not valid JSON ({e})") from None
    try:
        tensors = load_file(str(weights_file))
    except SafetensorError as e:
        raise SAELoadError(f"{weights_file}: not a readable safetensors file ({e})") from None
    if "W_enc" not in tensors:
        raise SAELoadError(f"{weights_file}: no W_enc tensor")
    shape = dict(zip(("d_in", "d_sae"), tensors["W_enc"].shape))
    for key, n in shape.items():
        if key in saved and saved[key] != n:
            raise SAELoadError(
                f"{cfg_file}: {key} is {saved[key]!r}, but {WEIGHTS_FILENAME} has {key} {n} "
                f"(W_enc shape {list(tensors['W_enc'].shape)} is [d_in, d_sae])"
            )
    for name, t in tensors.items():
        bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
        if bad:
            raise SAELoadError(
                f"{weights_file}: tensor {name} holds {bad} NaN or infinite values of "
                f"{t.numel()}; expected finite weights"
            )
    return saved, tensors


def _saved_architecture(saved: dict[str, Any]) -> str | None:
    """The raysae architecture of a saved cfg: raysae's own record, else a BatchTopK SAE that
    SAELens saved as JumpReLU (its metadata names the training architecture), else the
    architecture SAELens loads it as."""
    meta = saved.get("metadata") or {}
    own = (meta.get("raysae") or {}).get("sae") or {}
    if "architecture" in own:
        return str(own["architecture"])
    arch = _FROM_SAELENS.get(str(saved.get("architecture", "standard")))
    if arch == "jumprelu" and meta.get("training_architecture") in BATCH_ARCHITECTURES:
        return str(meta["training_architecture"])
    return arch


def _config_from_saved(saved: dict[str, Any], path: Path) -> tuple[SAEConfig, SAEMetadata]:
    meta = saved.get("metadata") or {}
    extras = dict(meta.get("raysae") or {})
    sae_dict = extras.pop("sae", None)
    metadata = SAEMetadata(**{k: meta.get(k, saved.get(k)) for k in _METADATA_KEYS}, extras=extras)
    if sae_dict is not None:
        return from_dict(SAEConfig, sae_dict, "sae"), metadata
    # A folder from SAELens itself: take what its cfg says.
    arch = _saved_architecture(saved)
    if arch is None:
        raise SAELoadError(
            f"{path / CFG_FILENAME}: architecture {saved.get('architecture')!r} is not one of "
            f"{sorted(_FROM_SAELENS)}"
        )
    if saved.get("apply_b_dec_to_input", True) is not True or saved.get(
        "normalize_activations", "none"
    ) not in ("none", None):
        raise SAELoadError(
            f"{path / CFG_FILENAME}: only apply_b_dec_to_input=true and "
            "normalize_activations='none' are supported"
        )
    kw: dict[str, Any] = {"architecture": arch, "d_sae": int(saved["d_sae"])}
    if arch == "topk":
        kw["k"] = int(saved.get("k", 100))
    if arch in BATCH_ARCHITECTURES:
        details = meta.get("training_architecture_details") or {}
        kw["k"] = max(1, round(float(details.get("k", 100))))
        if arch == "matryoshka_batchtopk":
            kw["matryoshka_widths"] = tuple(int(w) for w in details.get("matryoshka_widths", ()))
    try:
        return SAEConfig(**kw), metadata
    except ConfigError as e:
        raise SAELoadError(f"{path / CFG_FILENAME}: {e}") from None


def _flatten(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


def _sum_sq_mean(err_BD: Tensor) -> Tensor:
    """Mean over rows of the squared L2 norm of each row."""
    return err_BD.pow(2).sum() / err_BD.shape[0]
