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

Each architecture is one registry entry: its spec in `raysae.architectures` (SAELens name and
cfg.json fields, config checks, cost) and its tensor maths in `raysae.sae_kernels` (on top of
the autograd functions of `raysae.sae_ops`); `SAE` calls them and branches on no name.

A saved folder holds `cfg.json` and `sae_weights.safetensors` and loads with SAELens's
`SAE.load_from_disk`; loading here reads only JSON and safetensors, never pickles. Pure torch:
this module must not import ray or mlflow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from raysae.architectures import THRESHOLD_LR, from_saelens, saelens_names
from raysae.checkpoint import write_folder_atomically
from raysae.config import ConfigError, SAEConfig, from_dict, to_dict
from raysae.sae_kernels import (
    SAELoadError,
    SAEOutput,
    TrainOutput,
    Weights,
    kernels_of,
    update_threshold_,
)
from raysae.sae_ops import _flatten, _sum_sq_mean

__all__ = ["CFG_FILENAME", "THRESHOLD_LR", "WEIGHTS_FILENAME", "SAE", "SAELoadError",
           "SAEMetadata", "SAEOutput", "TrainOutput", "geometric_median"]

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"

# SAELens's LLM metadata keys that raysae fills in.
_METADATA_KEYS = ("model_name", "hook_name", "context_size", "prepend_bos")

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


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
        self.widths = cfg.prefix_widths(d_in)  # also the architecture's checks at this width
        self.cfg = cfg
        self.kernels = kernels_of(cfg.architecture)
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
        self.kernels.add_state(self, cfg, d_sae, kw)
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
        return self.kernels.has_threshold

    @property
    def threshold(self) -> Tensor:
        """θ per latent [d_sae]: exp(log_threshold) (jumprelu), or the one running threshold
        of batchtopk and matryoshka_batchtopk (0, i.e. a ReLU, before any training)."""
        return self.kernels.threshold(self)

    def update_threshold_(self, min_active: Tensor) -> None:
        """Move the batchtopk threshold towards a batch's smallest kept activation (an
        exponential running average at rate THRESHOLD_LR; the first batch sets it; a batch
        that kept none leaves it). On the device: no host sync."""
        update_threshold_(self.topk_threshold, min_active)

    # -- the maths ----------------------------------------------------------------------------

    def encode(self, x_BD: Tensor) -> Tensor:
        """Latent activations f(x) [.., d_sae] (dense). batchtopk and matryoshka_batchtopk
        encode as at inference (and as SAELens loads them): gated at the threshold, token by
        token; their batch-level selection is training's (`train_forward`)."""
        x_BD, shape = _flatten(x_BD)
        return self.kernels.encode(self, x_BD).reshape(*shape, self.d_sae)

    def decode(self, feats_BF: Tensor) -> Tensor:
        """Reconstruction x̂ = f W_dec + b_dec [.., d_in]."""
        f_BF, shape = _flatten(feats_BF)
        return torch.addmm(self.b_dec, f_BF, self.W_dec).reshape(*shape, self.d_in)

    def forward(self, x_BD: Tensor, sparsity_coeff: float | Tensor | None = None) -> SAEOutput:
        """Encode, decode and score a batch [B, d_in]; `sparsity_coeff` defaults to the config's."""
        coeff = self.cfg.l1_coefficient if sparsity_coeff is None else sparsity_coeff
        feats_BF, sparsity = self.kernels.scored_encode(self, x_BD)
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
        loss (at least float32), for the architectures whose kernels allow it (`autocast`).
        """
        dev = x_BD.device.type
        amp = torch.is_autocast_enabled(dev) and self.kernels.autocast
        dt = torch.get_autocast_dtype(dev) if amp else self.W_enc.dtype
        loss_dt = torch.promote_types(dt, torch.float32)
        with torch.autocast(dev, enabled=False):
            x_c = x_BD.to(dt)
            w = Weights(*(p.to(dt) for p in (self.W_enc, self.b_enc, self.W_dec, self.b_dec)),
                        loss_dt)
            return self.kernels.train_forward(self, x_BD, x_c, w, dead_F, sparsity_coeff)

    def after_step_(self, out: TrainOutput) -> None:
        """What the architecture does after an optimiser step on `out` (decoder rows back to
        unit norm, the running threshold's update)."""
        self.kernels.after_step(self, out)

    def probe_metrics(self) -> dict[str, float]:
        """The architecture's own metrics at a log step (the running threshold)."""
        return self.kernels.probe_metrics(self)

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
        meta, spec = self.metadata, self.cfg.spec
        llm = {k: getattr(meta, k) for k in _METADATA_KEYS}
        cfg: dict[str, Any] = {
            "architecture": spec.saelens_name,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": str(self.W_enc.dtype).removeprefix("torch."),
            "device": self.W_enc.device.type,
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
        }
        top, training = spec.saelens_fields(self.cfg, self.widths)
        cfg.update(top)
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
        file = path / WEIGHTS_FILENAME
        missing = [n for n in names if n not in tensors]
        if missing:
            raise SAELoadError(f"{file}: missing tensors {missing}")
        for name in names:
            if name == "threshold":  # the architecture's own state behind it
                self.kernels.load_threshold(self, tensors[name], file)
            else:
                self.copy_checked(name, tensors[name], file)

    @torch.no_grad()
    def copy_checked(self, name: str, value: Tensor, file: Path) -> None:
        """Copy a saved tensor of `file` into parameter `name`, refusing another shape."""
        param = getattr(self, name)
        if tuple(value.shape) != tuple(param.shape):
            raise SAELoadError(
                f"{file}: tensor {name} has shape {list(value.shape)}, "
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
    spec = from_saelens(str(saved.get("architecture", "standard")),
                        meta.get("training_architecture"))
    return None if spec is None else spec.name


def _config_from_saved(saved: dict[str, Any], path: Path) -> tuple[SAEConfig, SAEMetadata]:
    meta = saved.get("metadata") or {}
    extras = dict(meta.get("raysae") or {})
    sae_dict = extras.pop("sae", None)
    metadata = SAEMetadata(**{k: meta.get(k, saved.get(k)) for k in _METADATA_KEYS}, extras=extras)
    if sae_dict is not None:
        return from_dict(SAEConfig, sae_dict, "sae"), metadata
    # A folder from SAELens itself: take what its cfg says.
    spec = from_saelens(str(saved.get("architecture", "standard")),
                        meta.get("training_architecture"))
    if spec is None:
        raise SAELoadError(
            f"{path / CFG_FILENAME}: architecture {saved.get('architecture')!r} is not one of "
            f"{saelens_names()}"
        )
    if saved.get("apply_b_dec_to_input", True) is not True or saved.get(
        "normalize_activations", "none"
    ) not in ("none", None):
        raise SAELoadError(
            f"{path / CFG_FILENAME}: only apply_b_dec_to_input=true and "
            "normalize_activations='none' are supported"
        )
    kw: dict[str, Any] = {"architecture": spec.name, "d_sae": int(saved["d_sae"]),
                          **spec.config_from_saelens(saved, meta)}
    try:
        return SAEConfig(**kw), metadata
    except ConfigError as e:
        raise SAELoadError(f"{path / CFG_FILENAME}: {e}") from None
