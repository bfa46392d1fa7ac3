"""Direct logit attribution of SAE features: what each feature writes straight into a logit.

A feature i of an SAE at some site adds f_i(x) · W_dec[i] to the residual stream; its direct
effect on a logit direction u (an unembedding row, or the difference of two) is what that write
contributes through the final norm and the unembedding, with every later block left out.
The final norm (`models.final_norm`) is read as y = γ ⊙ C(r) / σ(r) + β on the last block's
output r (`norm_frame`), and σ is frozen at its actual value so that the effect is linear in f:

    attr_i = f_i(x) · (C(W_dec[i]) ⊙ γ) · u / σ(r)

Both studies use it: the layer-transfer study's task circuits (`features.circuits.task_dla`,
u = W_U[correct] - W_U[wrong]) and the stitching study's feature classes
(`stitching.feature_classes.logit_attribution`, u = W_U[next token]); the layer-transfer
study's top and bottom logit tokens read the decoder rows through the same frame
(`transfer.scores.top_logit_tokens`).

Pure torch: no ray, no mlflow.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from raysae.models import final_norm
from raysae.sae import SAE


class NormFrame(NamedTuple):
    """The final norm read as y = γ ⊙ C(x) / σ(x) + β, where C is the centring (LayerNorm)
    or the identity (RMSNorm)."""

    gamma_D: Tensor
    """The effective per-dimension gain γ (float64)."""
    centred: bool
    """Whether the norm subtracts the mean over dimensions (LayerNorm) or not (RMSNorm)."""
    eps: float
    """The ε inside σ(x) = sqrt(mean_d C(x)_d² + ε)."""

    def centre(self, x_ND: Tensor) -> Tensor:
        """C(x) in float64: minus the mean over the last dimension for a LayerNorm."""
        x = x_ND.to(torch.float64)
        return x - x.mean(-1, keepdim=True) if self.centred else x

    def scale(self, x_ND: Tensor) -> Tensor:
        """σ(x) [N] in float64: the norm's divisor on each row."""
        return (self.centre(x_ND).square().mean(-1) + self.eps).sqrt()


def norm_frame(norm: nn.Module, x_final_ND: Tensor) -> NormFrame:
    """Read γ, centring and ε of a final norm, checked against its own output on `x_final_ND`.

    LayerNorm and every RMSNorm spelling are covered without naming classes: the candidates
    (centred or not) x (γ = weight, or 1 + weight as in Gemma) are tried until one reproduces
    `norm(x)`; anything else (a norm of another form) is refused with an error.
    """
    x = x_final_ND.detach()
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    eps_attr = getattr(norm, "eps", None)
    if eps_attr is None:
        eps_attr = getattr(norm, "variance_epsilon", None)  # Llama-style RMSNorms
    # torch.nn.RMSNorm(eps=None) uses the input dtype's machine epsilon
    eps = float(eps_attr) if eps_attr is not None else float(torch.finfo(x.dtype).eps)
    with torch.no_grad():
        out = norm(x).to(torch.float64)
    ones = torch.ones(x.shape[-1], dtype=torch.float64, device=x.device)
    w = ones if weight is None else weight.detach().to(torch.float64)
    beta = 0.0 if bias is None else bias.detach().to(torch.float64)
    rel = 1e-4 if x.dtype in (torch.float32, torch.float64) else 3e-2
    tol = rel * (1 + float(out.abs().max()))
    for centred in (True, False):
        for gamma in (w, 1 + w) if weight is not None else (ones,):
            frame = NormFrame(gamma, centred, eps)
            pred = gamma * frame.centre(x) / frame.scale(x)[..., None] + beta
            if float((pred - out).abs().max()) <= tol:
                return frame
    raise ValueError(
        f"the final norm {type(norm).__name__} is neither a LayerNorm nor an RMSNorm "
        "(γ ⊙ x / rms(x) with γ = weight or 1 + weight): direct logit attribution needs one"
    )


def final_norm_frame(model: nn.Module, rows: int = 8) -> NormFrame:
    """`norm_frame` of the model's final norm (`models.final_norm`), read on seeded random rows
    of the residual width: the frame (γ, centring, ε) does not depend on the input, so no
    forward pass is needed where no activations are at hand."""
    W_U_VD = model.get_output_embeddings().weight
    gen = torch.Generator().manual_seed(0)
    x_ND = torch.randn(rows, W_U_VD.shape[1], generator=gen).to(W_U_VD.device, W_U_VD.dtype)
    return norm_frame(final_norm(model), x_ND)


def direct_attribution(
    sae: SAE, frame: NormFrame, f_tF: Tensor, final_tD: Tensor, u_tD: Tensor
) -> Tensor:
    """attr [t, F] (float64): f_i(x_t) · (C(W_dec[i]) ⊙ γ) · u_t / σ_t, the direct effect of
    feature i on token t's logit direction u_t (an unembedding row, or a difference of two),
    the final norm read by `frame` with σ_t frozen at the last block's output `final_tD`."""
    dev = sae.W_dec.device
    # What each decoder row writes through the norm (σ frozen): C(W_dec_i) ⊙ γ.
    dirs_FD = frame.centre(sae.W_dec.detach()) * frame.gamma_D.to(dev)
    sigma_t = frame.scale(final_tD).to(dev)
    return f_tF.double() * (u_tD.to(dev, torch.float64) @ dirs_FD.T) / sigma_t[:, None]
