"""The SAE architectures raysae knows, as torch-free specs: one registry entry per architecture.

A spec holds everything about an architecture that is not tensor maths: its name (the value
`sae.architecture` takes), the architecture SAELens saves and loads it as and the cfg.json
fields that go with it (both ways), whether `k` sets its sparsity, its config checks, and the
FLOPs and memory per token that `raysae.costs` prices it at. Its tensor maths (encoders, fused
training steps) are registered against the same name in `raysae.sae_kernels`; adding an
architecture is one spec here (or `register` from anywhere) plus its kernels there.

The config layer (`raysae.config`) reads this module, so it imports nothing from raysae and
never torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

Problem = tuple[str, Any, str]
"""A failed config check: (field, value, what was expected), for `config._fail`."""

THRESHOLD_LR = 0.01
"""Rate of the running average that estimates a BatchTopK threshold (SAELens's
`topk_threshold_lr`; the first batch sets it outright)."""


def dense_sae_flops_per_token(d_in: int, d_sae: int) -> float:
    """FLOPs per token of one SAE training step as a dense implementation runs it (the
    stitching paper's accounting: its TopK latents are a dense [B, d_sae] matrix), whatever the
    architecture: five [d_in, d_sae]-sized products, 2·d_in·d_sae each (the encoder and the
    decoder forward; the decoder's weight and latent gradients and the encoder's weight
    gradient; the activations need no gradient), i.e. 10·d_in·d_sae. Biases, the top-k
    selection and b_dec's encoder-side matvec (O(d_in·d_sae) per batch) are not counted.

    `raysae.train.sae_flops_per_token` counts what raysae runs: the same for relu and jumprelu
    (within O(1/d_in)), about 2·d_in·d_sae + 10·d_in·k for TopK, whose decode and backward are
    sparse.
    """
    return 10.0 * d_in * d_sae


@dataclass(frozen=True)
class ArchitectureSpec:
    """A dense architecture (relu's shape); the others override what differs. `cfg` below is a
    `raysae.config.SAEConfig` (not imported: config imports this module)."""

    name: str
    """The value of `sae.architecture`."""
    saelens_name: str
    """The architecture SAELens saves and loads it as (cfg.json's `architecture`)."""
    native: bool = True
    """Whether a SAELens folder of `saelens_name` that names no training architecture loads as
    this one (False for those SAELens saves under another's name, as BatchTopK as JumpReLU)."""
    uses_k: bool = False
    """Whether `k` sets the sparsity (decoder rows kept at unit norm, the AuxK loss)."""
    params_per_latent: int = 0
    """Trained parameters per latent beyond the encoder bias (jumprelu's threshold)."""

    def problems(self, cfg: Any, d_sae: int | None, width: str) -> Iterator[Problem]:
        """The config checks of this architecture at dictionary width `d_sae` (None: not known
        yet), which messages call `width` (e.g. "sae.d_sae (512)")."""
        return iter(())

    def prefix_widths(self, cfg: Any, d_sae: int) -> tuple[int, ...]:
        """The widths whose prefixes are trained to reconstruct (the whole dictionary)."""
        return (d_sae,)

    def step_flops_per_token(self, cfg: Any, d_in: int, d_sae: int) -> float:
        """Training FLOPs per token of one step: five dense products of d_in x d_sae."""
        return dense_sae_flops_per_token(d_in, d_sae)

    def parameters(self, d_in: int, d_sae: int) -> int:
        """Trained parameters: both weight matrices, both biases, any per-latent extras."""
        return 2 * d_in * d_sae + d_sae + d_in + self.params_per_latent * d_sae

    def saelens_fields(self, cfg: Any, widths: tuple[int, ...]) -> tuple[dict, dict]:
        """What cfg.json adds for this architecture: (top-level keys, metadata keys)."""
        return {}, {}

    def config_from_saelens(self, saved: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        """`SAEConfig` fields (beyond architecture and d_sae) read from a SAELens cfg.json."""
        return {}


@dataclass(frozen=True)
class TopKSpec(ArchitectureSpec):
    """An architecture whose sparsity `k` sets: a dense encoder, sparse decode and backward."""

    uses_k: bool = True

    def problems(self, cfg: Any, d_sae: int | None, width: str) -> Iterator[Problem]:
        if d_sae is not None and cfg.k > d_sae:
            yield "sae.k", cfg.k, f"at most {width}"

    def step_flops_per_token(self, cfg: Any, d_in: int, d_sae: int) -> float:
        """The dense encoder forward plus five sparse products over the k active latents
        (2·d·F + 10·d·k; measured ~2·d·F + 10.5·d·k); AuxK adds 4·d·(d/2)."""
        aux = 4.0 * d_in * (d_in // 2) if cfg.aux_coefficient > 0 else 0.0
        return 2.0 * d_in * d_sae + 10.0 * d_in * cfg.k + aux

    def saelens_fields(self, cfg: Any, widths: tuple[int, ...]) -> tuple[dict, dict]:
        return {"k": cfg.k}, {}

    def config_from_saelens(self, saved: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        return {"k": int(saved.get("k", 100))}


@dataclass(frozen=True)
class BatchTopKSpec(TopKSpec):
    """k per token on average over a batch in training, one threshold at inference; SAELens
    saves it as JumpReLU, naming the training architecture in the metadata."""

    saelens_name: str = "jumprelu"
    native: bool = False

    def training_details(self, cfg: Any, widths: tuple[int, ...]) -> dict[str, Any]:
        """SAELens's `training_architecture_details` (the training config's fields)."""
        return {"k": cfg.k, "topk_threshold_lr": THRESHOLD_LR,
                "aux_loss_coefficient": cfg.aux_coefficient, "rescale_acts_by_decoder_norm": True}

    def saelens_fields(self, cfg: Any, widths: tuple[int, ...]) -> tuple[dict, dict]:
        return {}, {"training_architecture": self.name,
                    "training_architecture_details": self.training_details(cfg, widths)}

    def config_from_saelens(self, saved: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        details = meta.get("training_architecture_details") or {}
        return {"k": max(1, round(float(details.get("k", 100))))}


@dataclass(frozen=True)
class MatryoshkaSpec(BatchTopKSpec):
    """BatchTopK whose nested prefixes (`sae.matryoshka_widths`) each reconstruct the input."""

    def problems(self, cfg: Any, d_sae: int | None, width: str) -> Iterator[Problem]:
        yield from super().problems(cfg, d_sae, width)
        w = cfg.matryoshka_widths
        if not w or w[0] < 1 or any(b <= a for a, b in zip(w, w[1:])):
            yield "sae.matryoshka_widths", w, "strictly increasing positive prefix widths"
        elif d_sae is not None and w[-1] != d_sae:
            yield "sae.matryoshka_widths", w, f"the last width equal to {width}"

    def prefix_widths(self, cfg: Any, d_sae: int) -> tuple[int, ...]:
        return tuple(cfg.matryoshka_widths)

    def training_details(self, cfg: Any, widths: tuple[int, ...]) -> dict[str, Any]:
        return super().training_details(cfg, widths) | {"matryoshka_widths": list(widths)}

    def config_from_saelens(self, saved: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        details = meta.get("training_architecture_details") or {}
        widths = tuple(int(w) for w in details.get("matryoshka_widths", ()))
        return super().config_from_saelens(saved, meta) | {"matryoshka_widths": widths}


ARCHITECTURES: dict[str, ArchitectureSpec] = {}
"""Every architecture by name, in registration order (the config's allowed values)."""


def register(spec: ArchitectureSpec) -> ArchitectureSpec:
    """Add an architecture; its name must be new."""
    if spec.name in ARCHITECTURES:
        raise ValueError(f"architecture {spec.name!r} is already registered")
    ARCHITECTURES[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove an architecture (for tests that register their own)."""
    del ARCHITECTURES[name]


def spec_of(name: str) -> ArchitectureSpec:
    """The spec of a registered architecture (KeyError naming the known ones otherwise)."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


def allowed() -> str:
    """The allowed names, as config errors list them."""
    return "one of " + ", ".join(repr(n) for n in ARCHITECTURES)


def from_saelens(saelens_name: str, training_architecture: Any) -> ArchitectureSpec | None:
    """The architecture a SAELens cfg.json holds: the training architecture its metadata names,
    if one of ours saves as `saelens_name`, else the one native to `saelens_name` (None if none)."""
    same = [s for s in ARCHITECTURES.values() if s.saelens_name == saelens_name]
    named = [s for s in same if s.name == training_architecture]
    native = [s for s in same if s.native]
    return (named or native or [None])[0]


def saelens_names() -> list[str]:
    """The SAELens architectures a folder from SAELens itself may hold."""
    return sorted({s.saelens_name for s in ARCHITECTURES.values() if s.native})


register(ArchitectureSpec("relu", "standard"))
register(TopKSpec("topk", "topk"))
register(ArchitectureSpec("jumprelu", "jumprelu", params_per_latent=1))
register(BatchTopKSpec("batchtopk"))
register(MatryoshkaSpec("matryoshka_batchtopk"))
