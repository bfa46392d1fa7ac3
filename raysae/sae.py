"""Sparse autoencoders: one interface, three architectures, saved in SAELens's folder format.

`SAE` holds the SAELens tensors (`W_enc [d_in, d_sae]`, `b_enc`, `W_dec [d_sae, d_in]`, `b_dec`,
plus `log_threshold` for JumpReLU) and picks its activation from `SAEConfig.architecture`:

- `relu`: f = ReLU(W_enc^T (x - b_dec) + b_enc); penalty Σ_i f_i ||W_dec_i|| (SAELens "standard").
- `topk`: the k largest pre-activations, after a ReLU; no penalty; decoder rows kept at unit norm
  by the training loop. Training decodes and back-propagates through the k active latents only.
- `jumprelu`: f = pre · H(pre - θ), θ = exp(log_threshold), penalty λ Σ_i H(pre_i - θ_i) (L0),
  trained with the straight-through rectangle-kernel estimator of Rajamanoharan et al. (2024).

The loss is ||x - x̂||² summed over d_in and averaged over tokens, plus the coefficient times the
penalty, the convention the paper's hyperparameters (lr 3e-5, λ = 5) were tuned with.

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

# raysae's architecture names and SAELens's spelling of the same thing.
SAELENS_ARCHITECTURE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}
_FROM_SAELENS = {v: k for k, v in SAELENS_ARCHITECTURE.items()}

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
    """mse + coefficient · sparsity."""


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


def _embedding_bag_weight_grad(idx_BK: Tensor, coef_BK: Tensor, x_BD: Tensor, n: int) -> Tensor:
    """Σ over (b, j) of coef[b, j] · x[b] added into row idx[b, j] of an [n, D] zero matrix.

    This is the weight gradient of `embedding_bag(idx, W, per_sample_weights=coef)` for upstream
    gradient x, which torch computes with a sorted scatter: B·k·D work instead of a dense
    [n, B] x [B, D] matmul.
    """
    with torch.enable_grad():
        W_nD = torch.zeros(n, x_BD.shape[1], dtype=x_BD.dtype, device=x_BD.device)
        W_nD.requires_grad_(True)
        out_BD = F.embedding_bag(
            idx_BK, W_nD, per_sample_weights=coef_BK.to(x_BD.dtype), mode="sum"
        )
        (grad_nD,) = torch.autograd.grad(out_BD, W_nD, x_BD)
    return grad_nD


class _TopKEncode(torch.autograd.Function):
    """TopK encoder returning (values [B, k], indices [B, k]) with a sparse backward.

    Only k of d_sae pre-activations per token receive gradient, so the encoder weight gradient
    is a scatter of B·k rows (see `_embedding_bag_weight_grad`) rather than a dense matmul
    against a mostly-zero [B, d_sae] gradient.
    """

    @staticmethod
    def forward(
        ctx: Any, x_BD: Tensor, b_dec_D: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, k: int
    ) -> tuple[Tensor, Tensor]:
        xc_BD = x_BD - b_dec_D
        pre_BF = torch.addmm(b_enc_F, xc_BD, W_enc_DF)
        vals_BK, idx_BK = pre_BF.topk(k, dim=-1, sorted=False)
        vals_BK = vals_BK.relu_()
        ctx.save_for_backward(xc_BD, W_enc_DF, idx_BK, vals_BK)
        ctx.mark_non_differentiable(idx_BK)
        return vals_BK, idx_BK

    @staticmethod
    def backward(ctx: Any, g_BK: Tensor, _g_idx: Tensor | None) -> tuple[Any, ...]:
        xc_BD, W_enc_DF, idx_BK, vals_BK = ctx.saved_tensors
        g_BK = g_BK * (vals_BK > 0)
        d_sae = W_enc_DF.shape[1]
        g_b_enc_F = torch.zeros(d_sae, dtype=g_BK.dtype, device=g_BK.device)
        g_b_enc_F.index_add_(0, idx_BK.flatten(), g_BK.flatten())
        g_W_enc_DF = _embedding_bag_weight_grad(idx_BK, g_BK, xc_BD, d_sae).t()
        g_b_dec_D = -(W_enc_DF @ g_b_enc_F.to(W_enc_DF.dtype))
        return None, g_b_dec_D, g_W_enc_DF, g_b_enc_F, None


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
        if cfg.architecture == "topk" and cfg.k > d_sae:
            raise ConfigError(f"sae.k: got {cfg.k}, expected at most d_sae ({d_sae})")
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

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def threshold(self) -> Tensor:
        """θ = exp(log_threshold) (jumprelu only)."""
        return self.log_threshold.exp()

    # -- the maths ----------------------------------------------------------------------------

    def _pre_acts(self, x_BD: Tensor) -> Tensor:
        bias_F = self.b_enc + _EncoderBDecGrad.apply(self.b_dec, self.W_enc.detach())
        return torch.addmm(bias_F, x_BD - self.b_dec.detach(), self.W_enc)

    def _topk(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        return _TopKEncode.apply(x_BD, self.b_dec, self.W_enc, self.b_enc, self.cfg.k)

    def encode(self, x_BD: Tensor) -> Tensor:
        """Latent activations f(x) [.., d_sae] (dense)."""
        x_BD, shape = _flatten(x_BD)
        arch = self.cfg.architecture
        if arch == "topk":
            vals_BK, idx_BK = self._topk(x_BD)
            feats_BF = vals_BK.new_zeros(x_BD.shape[0], self.d_sae).scatter(1, idx_BK, vals_BK)
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
        recon_BD = self.decode(feats_BF)
        mse = _sum_sq_mean(_flatten(recon_BD - x_BD)[0])
        return SAEOutput(recon_BD, feats_BF, mse, sparsity, mse + coeff * sparsity)

    def train_forward(self, x_BD: Tensor, sparsity_coeff: float | Tensor) -> TrainOutput:
        """The training step's forward: the loss of `forward`, computed at least cost.

        relu and topk run through fused autograd functions (no dense latents for topk). Under
        autocast, everything runs in the autocast dtype except the loss (at least float32).
        """
        dev = x_BD.device.type
        amp = torch.is_autocast_enabled(dev)
        dt = torch.get_autocast_dtype(dev) if amp else self.W_enc.dtype
        with torch.autocast(dev, enabled=False):
            x_c = x_BD.to(dt)
            W_enc_DF, b_enc_F, W_dec_FD, b_dec_D = (
                p.to(dt) for p in (self.W_enc, self.b_enc, self.W_dec, self.b_dec)
            )
            arch = self.cfg.architecture
            if arch == "relu":
                recon_BD, sparsity, fired_F = _ReluTrain.apply(
                    x_c, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D
                )
            elif arch == "topk":
                vals_BK, idx_BK = _TopKEncode.apply(x_c, b_dec_D, W_enc_DF, b_enc_F, self.cfg.k)
                # A bag-sum of the k chosen decoder rows: B·k·D work, not B·d_sae·D.
                recon_BD = F.embedding_bag(idx_BK, W_dec_FD, per_sample_weights=vals_BK, mode="sum")
                recon_BD = recon_BD + b_dec_D
                hits_F = vals_BK.new_zeros(self.d_sae, dtype=torch.float32)
                hits_F.index_add_(0, idx_BK.flatten(), (vals_BK > 0).flatten().float())
                sparsity, fired_F = recon_BD.new_zeros(()), hits_F > 0
            else:
                bias_F = b_enc_F + _EncoderBDecGrad.apply(b_dec_D, W_enc_DF.detach())
                pre_BF = torch.addmm(bias_F, x_c - b_dec_D.detach(), W_enc_DF)
                theta_F, eps = self.threshold.to(dt), self.cfg.jumprelu_bandwidth
                feats_BF = _JumpReLU.apply(pre_BF, theta_F, eps)
                recon_BD = torch.addmm(b_dec_D, feats_BF, W_dec_FD)
                sparsity = _Step.apply(pre_BF, theta_F, eps).sum(-1).mean()
                fired_F = (x_c.new_ones(x_c.shape[0]) @ feats_BF.detach()) > 0
            loss_dt = torch.promote_types(dt, torch.float32)
            mse = _sum_sq_mean(recon_BD.to(loss_dt) - x_BD.to(loss_dt))
            sparsity = sparsity.to(loss_dt)
        return TrainOutput(mse + sparsity_coeff * sparsity, mse, sparsity, fired_F)

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
        """Rescale every decoder row to unit norm (done after each topk step)."""
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
        # No sae_lens_version is claimed, so SAELens reads this through its pre-6.0 path, which
        # rebuilds metadata from top-level keys: mirror them there so they survive that path.
        cfg.update(llm)
        cfg["metadata"] = {**llm, "raysae": {"sae": to_dict(self.cfg), **meta.extras}}
        return cfg

    def save(self, path: str | Path) -> Path:
        """Write `cfg.json` + `sae_weights.safetensors` to folder `path` (atomically replaced)."""
        tensors = {
            name: getattr(self, name).detach().contiguous()
            for name in ("W_enc", "b_enc", "W_dec", "b_dec")
        }
        if self.cfg.architecture == "jumprelu":
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
        saved_arch = _FROM_SAELENS.get(str(saved.get("architecture")))
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
        if self.cfg.architecture == "jumprelu":
            names.append("threshold")
        missing = [n for n in names if n not in tensors]
        if missing:
            raise SAELoadError(f"{path / WEIGHTS_FILENAME}: missing tensors {missing}")
        for name in names:
            value = tensors[name]
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


def _config_from_saved(saved: dict[str, Any], path: Path) -> tuple[SAEConfig, SAEMetadata]:
    meta = saved.get("metadata") or {}
    extras = dict(meta.get("raysae") or {})
    sae_dict = extras.pop("sae", None)
    metadata = SAEMetadata(**{k: meta.get(k, saved.get(k)) for k in _METADATA_KEYS}, extras=extras)
    if sae_dict is not None:
        return from_dict(SAEConfig, sae_dict, "sae"), metadata
    # A folder from SAELens itself: take what its cfg says.
    arch = _FROM_SAELENS.get(str(saved.get("architecture", "standard")))
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
    return SAEConfig(**kw), metadata


def _flatten(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


def _sum_sq_mean(err_BD: Tensor) -> Tensor:
    """Mean over rows of the squared L2 norm of each row."""
    return err_BD.pow(2).sum() / err_BD.shape[0]
