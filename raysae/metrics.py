"""The evaluation maths, as pure functions of tensors and numbers.

Reconstruction (explained variance, MSE), sparsity (L0, L1, dead and dense latents) and the
CE-loss and KL scores of a spliced model, and normalized CES (a CES measured against two others:
the stop rules of the core and the layer-transfer study both read it, so it lives below both);
the study's other scores (MMCS, transfer scores) are in `raysae.transfer.scores`. Running an LM to get the cross-entropies is someone else's job
(the splice evaluation); this module only combines the numbers. Pure torch, no model code.

Conventions: tensors are [tokens, width]; `*_BD` inputs, `*_BF` latents, `*_F` per latent.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ExplainedVariance:
    """1 - E||x - x̂||² / (E||x||² - ||E x||²), accumulated batch by batch in float64.

    The denominator is the total variance around the data mean (not around zero, which inflates
    the figure for activations with a large mean), and every sum is kept in float64 so that
    millions of tokens add up without cancellation.
    """

    def __init__(self) -> None:
        self.n = 0
        self.sq_err = 0.0
        self.sq_norm = 0.0
        self.sum_D: Tensor | None = None

    @torch.no_grad()
    def update(self, x_BD: Tensor, recon_BD: Tensor) -> None:
        """Add a batch of inputs and their reconstructions ([.., D])."""
        x = x_BD.reshape(-1, x_BD.shape[-1]).to(torch.float64)
        r = recon_BD.reshape(-1, recon_BD.shape[-1]).to(torch.float64)
        self.sq_err += float((x - r).pow(2).sum())
        self.sq_norm += float(x.pow(2).sum())
        s = x.sum(0)
        self.sum_D = s if self.sum_D is None else self.sum_D + s.to(self.sum_D.device)
        self.n += x.shape[0]

    def compute(self) -> float:
        """The explained variance of everything added so far (nan before any data)."""
        if self.n == 0 or self.sum_D is None:
            return float("nan")
        mean_D = self.sum_D / self.n
        total_var = self.sq_norm / self.n - float(mean_D.pow(2).sum())
        if total_var <= 0:
            return float("nan")
        return 1.0 - (self.sq_err / self.n) / total_var


def explained_variance(x_BD: Tensor, recon_BD: Tensor) -> float:
    """Explained variance of one batch (see `ExplainedVariance`)."""
    acc = ExplainedVariance()
    acc.update(x_BD, recon_BD)
    return acc.compute()


@torch.no_grad()
def mse(x_BD: Tensor, recon_BD: Tensor) -> float:
    """Mean squared error per element (what SAELens's evals report as `mse`)."""
    return float((x_BD.to(torch.float64) - recon_BD.to(torch.float64)).pow(2).mean())


@torch.no_grad()
@torch.no_grad()
def l0(feats_BF: Tensor) -> float:
    """Mean number of non-zero latents per token."""
    return float((feats_BF != 0).sum(-1).to(torch.float64).mean())


@torch.no_grad()
def l1(feats_BF: Tensor) -> float:
    """Mean over tokens of the L1 norm of the latents."""
    return float(feats_BF.abs().to(torch.float64).sum(-1).mean())


@torch.no_grad()
def dead_fraction(tokens_since_fired_F: Tensor, window_tokens: int) -> float:
    """Share of latents that have not fired in the last `window_tokens` tokens, given each
    latent's tokens since it last fired (what the training loop tracks)."""
    return float((tokens_since_fired_F >= window_tokens).to(torch.float64).mean())


@torch.no_grad()
def dead_fraction_from_counts(fire_counts_F: Tensor) -> float:
    """Share of latents that never fired, given per-latent firing counts over a sample."""
    return float((fire_counts_F == 0).to(torch.float64).mean())


@torch.no_grad()
def dense_fraction(fire_counts_F: Tensor, num_tokens: int, threshold: float = 0.1) -> float:
    """Share of latents firing on more than `threshold` of `num_tokens` tokens."""
    freq_F = fire_counts_F.to(torch.float64) / num_tokens
    return float((freq_F > threshold).to(torch.float64).mean())


def ces(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """CE-loss score (zero-ablation - spliced) / (zero-ablation - clean): 1 = perfect, 0 = as bad
    as zeroing the site."""
    return (ce_zero - ce_spliced) / (ce_zero - ce_clean)


def normalized_ces_defined(ces_zero_shot: float, ces_scratch: float) -> bool:
    """Whether `normalized_ces` measures progress toward the scratch SAE: only while the scratch
    SAE beats the source read zero-shot (otherwise the denominator is zero or negative)."""
    return ces_scratch > ces_zero_shot


def normalized_ces(ces_transfer: float, ces_zero_shot: float, ces_scratch: float) -> float:
    """The transfer paper's normalized CES on layer i of SAE_{i<-j}:

    (CES(SAE_{i<-j}) - CES(SAE_j)) / (CES(SAE_i) - CES(SAE_j)), all measured on layer i: 0 = no
    better than using SAE_j zero-shot, 1 = as good as training SAE_i from scratch.
    """
    return (ces_transfer - ces_zero_shot) / (ces_scratch - ces_zero_shot)


def kl_score(kl_spliced: float, kl_zero: float) -> float:
    """KL score (KL(zero) - KL(spliced)) / KL(zero), KLs of the patched next-token distribution
    from the clean one: 1 = perfect, 0 = as bad as zero-ablation."""
    return (kl_zero - kl_spliced) / kl_zero
