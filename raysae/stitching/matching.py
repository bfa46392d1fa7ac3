"""Which layer of model B matches a layer of model A: representation similarity between layers.

The stitching paper pairs a layer of the small model A with the layer of the large model B whose
residual stream has the highest mean SVCCA correlation with it on a small sample of tokens.
`layer_similarity` computes the whole [L_A, L_B] matrix from one forward pass of each model (every
layer cached at once), `best_matches` reads the pairing off it. Two measures:

- SVCCA (Raghu et al. 2017): centre each side, keep the leading singular directions that hold a
  share `keep` of its variance, then the mean canonical correlation between the two subspaces.
  Invariant to any invertible linear map of either side when nothing is cut (`keep=1`), and to
  rotations and isotropic scaling at any `keep`.
- linear CKA (Kornblith et al. 2019): ||XᵀY||²_F / (||XᵀX||_F ||YᵀY||_F) on centred data;
  invariant to rotations and isotropic scaling, not to general invertible maps.

Both take rows = tokens and need many more tokens than dimensions (with N <= D every pair of
random matrices looks perfectly correlated). Everything is computed in float64. Pure torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from raysae.models import get_blocks, hook_name, model_device, run_with_cache

Method = Literal["svcca", "cka"]

_ROWS_PER_DIM = 20
"""Default token sample: this many tokens per dimension of the wider model (N >> D)."""


# ---------------------------------------------------------------------------------------------
# The measures, on [N, D] matrices of the same N tokens


def _centred(x_ND: Tensor) -> Tensor:
    if x_ND.ndim != 2:
        raise ValueError(f"expected a [tokens, dims] matrix, got shape {tuple(x_ND.shape)}")
    x = x_ND.detach().to(torch.float64)
    return x - x.mean(0)


def principal_basis(x_ND: Tensor, keep: float = 0.99) -> Tensor:
    """An orthonormal basis [N, K] of the centred data's leading singular directions (in token
    space) that together hold at least a share `keep` of its variance; directions at the level
    of rounding noise are never kept. The SVD step of SVCCA."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep: got {keep}, expected 0 < keep <= 1")
    x = _centred(x_ND)
    U_NK, S_K, _ = torch.linalg.svd(x, full_matrices=False)
    tol = (S_K.max() if S_K.numel() else 0.0) * max(x.shape) * torch.finfo(torch.float64).eps
    rank = int((S_K > tol).sum())
    if rank == 0:
        raise ValueError("the data has no variance (every row is the same)")
    energy_K = S_K[:rank].square().cumsum(0)
    energy_K /= energy_K[-1].clone()
    k = int(torch.searchsorted(energy_K, torch.tensor(keep, dtype=torch.float64))) + 1
    return U_NK[:, : min(k, rank)]


def _mean_canonical_corr(u_NK: Tensor, v_NM: Tensor) -> float:
    # With orthonormal bases of both subspaces, the canonical correlations are the singular
    # values of uᵀv (the cosines of the principal angles): no covariance is ever inverted.
    rho = torch.linalg.svdvals(u_NK.T @ v_NM).clamp(0.0, 1.0)
    return float(rho.mean())


def svcca(x_ND: Tensor, y_NE: Tensor, keep: float = 0.99) -> float:
    """Mean canonical correlation between x and y (rows are the same tokens) after reducing
    each to the singular directions that hold a share `keep` of its variance. In [0, 1]."""
    if x_ND.shape[0] != y_NE.shape[0]:
        raise ValueError(f"x has {x_ND.shape[0]} rows, y has {y_NE.shape[0]}")
    return _mean_canonical_corr(principal_basis(x_ND, keep), principal_basis(y_NE, keep))


def linear_cka(x_ND: Tensor, y_NE: Tensor) -> float:
    """Linear CKA ||XᵀY||²_F / (||XᵀX||_F ||YᵀY||_F) of the centred data. In [0, 1]."""
    if x_ND.shape[0] != y_NE.shape[0]:
        raise ValueError(f"x has {x_ND.shape[0]} rows, y has {y_NE.shape[0]}")
    return _cka_pair(_cka_reduce(x_ND), _cka_reduce(y_NE))


def _cka_reduce(x_ND: Tensor) -> tuple[Tensor, Tensor]:
    """The centred data and ||XᵀX||_F: what CKA needs of one side."""
    x = _centred(x_ND)
    return x, (x.T @ x).norm()


def _cka_pair(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> float:
    (x_ND, xx), (y_NE, yy) = a, b
    denom = float(xx * yy)
    if denom == 0.0:
        raise ValueError("the data has no variance (every row is the same)")
    return float((x_ND.T @ y_NE).norm().square()) / denom


# ---------------------------------------------------------------------------------------------
# Layers of two models


def _sample_positions(mask_NT: Tensor, max_rows: int, seed: int) -> Tensor:
    """[R, 2] (sequence, position) pairs of unmasked tokens, at most `max_rows`, sorted."""
    pos_R2 = mask_NT.nonzero()
    if len(pos_R2) > max_rows:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(pos_R2), generator=gen)[:max_rows].sort().values
        pos_R2 = pos_R2[pick]
    return pos_R2


@torch.inference_mode()
def layer_activations(
    model: nn.Module,
    input_ids_NT: Tensor,
    site: str,
    layers: Sequence[int],
    positions_R2: Tensor,
    batch_size: int = 32,
) -> dict[int, Tensor]:
    """Residual stream [R, D] (float64, CPU) at (site, layer) for every layer, on the tokens at
    `positions_R2` (sequence, position); one truncated forward per batch of sequences caches
    every layer."""
    device = model_device(model)
    sites = [(site, layer) for layer in layers]
    out: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    seq_R = positions_R2[:, 0]
    for b0 in range(0, input_ids_NT.shape[0], batch_size):
        in_batch = (seq_R >= b0) & (seq_R < b0 + batch_size)
        if not in_batch.any():
            continue  # no sampled token here: skip the forward
        n_R, t_R = seq_R[in_batch] - b0, positions_R2[in_batch, 1]
        cache = run_with_cache(model, input_ids_NT[b0 : b0 + batch_size].to(device), sites)
        for layer in layers:
            acts_BTD = cache[hook_name(site, layer)]
            out[layer].append(acts_BTD[n_R.to(device), t_R.to(device)].cpu().to(torch.float64))
    return {layer: torch.cat(parts) for layer, parts in out.items()}


def _width(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[1])


@torch.inference_mode()
def layer_similarity(
    model_a: nn.Module,
    model_b: nn.Module,
    input_ids_NT: Tensor,
    site: str,
    method: Method = "svcca",
    layers_a: Sequence[int] | None = None,
    layers_b: Sequence[int] | None = None,
    mask_NT: Tensor | None = None,
    *,
    keep: float = 0.99,
    max_rows: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> Tensor:
    """Similarity [L_A, L_B] (float64) between the residual streams at `site` of every layer of
    A (`layers_a`, default all) and of B (`layers_b`, default all), on the same tokens.

    Tokens where `mask_NT` is False (special tokens, padding) are left out; of the rest, a
    random sample of `max_rows` (default 20 x the wider model's d_model, seeded) is used, so
    that there are many more tokens than dimensions. `method` is "svcca" (with `keep`) or "cka".
    """
    if method not in ("svcca", "cka"):
        raise ValueError(f"method: got {method!r}, expected 'svcca' or 'cka'")
    layers_a = list(range(len(get_blocks(model_a)))) if layers_a is None else list(layers_a)
    layers_b = list(range(len(get_blocks(model_b)))) if layers_b is None else list(layers_b)
    if mask_NT is None:
        mask_NT = torch.ones(input_ids_NT.shape, dtype=torch.bool)
    if mask_NT.shape != input_ids_NT.shape:
        raise ValueError(f"mask shape {tuple(mask_NT.shape)} != ids {tuple(input_ids_NT.shape)}")
    width = max(_width(model_a), _width(model_b))
    positions_R2 = _sample_positions(
        mask_NT.cpu().bool(), max_rows or _ROWS_PER_DIM * width, seed
    )
    if len(positions_R2) < 5 * width:
        warnings.warn(
            f"layer similarity from {len(positions_R2)} tokens for d_model {width}: use many "
            "more tokens than dimensions, or every layer pair looks similar",
            stacklevel=2,
        )
    acts_a = layer_activations(model_a, input_ids_NT, site, layers_a, positions_R2, batch_size)
    acts_b = layer_activations(model_b, input_ids_NT, site, layers_b, positions_R2, batch_size)
    # Each layer is reduced once; the L_A x L_B pairs then cost small matrix products.
    reduce: Callable[[Tensor], Any]
    pair: Callable[[Any, Any], float]
    if method == "svcca":
        reduce, pair = partial(principal_basis, keep=keep), _mean_canonical_corr
    else:
        reduce, pair = _cka_reduce, _cka_pair
    red_a = [reduce(acts_a[i]) for i in layers_a]
    red_b = [reduce(acts_b[j]) for j in layers_b]
    sim_AB = torch.empty(len(layers_a), len(layers_b), dtype=torch.float64)
    for i, ra in enumerate(red_a):
        for j, rb in enumerate(red_b):
            sim_AB[i, j] = pair(ra, rb)
    return sim_AB


def best_matches(
    sim_AB: Tensor, layers_a: Sequence[int] | None = None, layers_b: Sequence[int] | None = None
) -> dict[int, int]:
    """For each layer of A (row), the layer of B (column) with the highest similarity; the
    labels default to 0..L-1. NaN entries never win; ties go to the shallower layer of B."""
    n_a, n_b = sim_AB.shape
    layers_a = list(range(n_a)) if layers_a is None else list(layers_a)
    layers_b = list(range(n_b)) if layers_b is None else list(layers_b)
    if (len(layers_a), len(layers_b)) != (n_a, n_b):
        raise ValueError(
            f"{len(layers_a)} x {len(layers_b)} layer labels for a {n_a} x {n_b} matrix"
        )
    sim = sim_AB.to(torch.float64).nan_to_num(nan=float("-inf"))
    best_A = sim.argmax(dim=1)
    return {la: layers_b[int(j)] for la, j in zip(layers_a, best_A)}
