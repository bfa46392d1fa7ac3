"""The SAE's autograd pieces: fused training steps with hand-written backwards, the sparse
encoder of the k architectures and the straight-through JumpReLU functions.

Pure tensor maths with no SAE object: `raysae.sae_kernels` composes these into each
architecture's encode and training forward. Pure torch: this module must not import ray or
mlflow.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


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


def _centred_with_ones(x_BD: Tensor, b_dec_D: Tensor) -> Tensor:
    """[x - b_dec, 1] in one buffer [B, D + 1]: the encoder's weights and bias then ride in one
    matmul, and its backward gives both gradients in one."""
    B, D = x_BD.shape
    xc_BD1 = x_BD.new_empty(B, D + 1)
    torch.sub(x_BD, b_dec_D, out=xc_BD1[:, :D])
    xc_BD1[:, D] = 1.0
    return xc_BD1


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
        xc_BD1 = _centred_with_ones(x_BD, b_dec_D)
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
        xc_BD1 = _centred_with_ones(x_BD, b_dec_D)
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



def _flatten(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


def _sum_sq_mean(err_BD: Tensor) -> Tensor:
    """Mean over rows of the squared L2 norm of each row."""
    return err_BD.pow(2).sum() / err_BD.shape[0]
