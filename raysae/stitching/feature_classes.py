"""Structural and semantic SAE features, and how well each one survives the stitch.

The stitching paper's feature-class analysis, per feature i of an SAE of model A and its twin
(feature i of the SAE transferred to model B through the stitch, `stitch.transfer_sae`):

- transfer quality: the Pearson correlation over tokens between feature i's direct logit
  attribution to the actual next token in A (`logit_attribution`) and its twin's in B;
- structural consistency: how often feature i, when it fires on a text of the variants file,
  also fires on that text's content rewrites (same template, other topic's words). Features that
  keep firing are "structural" (syntax, position, template), the others "semantic" (content).

The paper's finding is that structural features transfer more consistently; `feature_class_table`
puts both numbers side by side and `class_summary` condenses them per class.

Pure torch (+ polars for the table): no ray, no mlflow.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from raysae.features.attribution import direct_attribution, norm_frame
from raysae.models import final_norm, get_blocks, hook_name, model_device, run_with_cache
from raysae.sae import SAE
from raysae.stitching.stitch import Stitch, transfer_sae

CLASSES = ("structural", "semantic", "inactive")
"""What `classify` can answer."""
SUMMARY_CLASSES = ("structural", "semantic")
"""The classes `class_summary` reports on."""


# ---------------------------------------------------------------------------------------------
# Direct logit attribution to the next token (`features.attribution`)


class Attribution(NamedTuple):
    """Direct logit attributions and firing counts of every feature on the selected tokens."""

    attr_TF: Tensor
    """Attribution of feature i on token t to the next token (float32, CPU)."""
    fire_counts_F: Tensor
    """Tokens on which each feature fired (f > 0)."""
    n_tokens: int
    """Tokens attributed (rows of attr_TF)."""


def _pair_mask(input_ids_NT: Tensor, mask_NT: Tensor | None) -> Tensor:
    """[N, T-1]: token t counts when it and its next token are both unmasked."""
    if mask_NT is None:
        return torch.ones(input_ids_NT.shape[0], input_ids_NT.shape[1] - 1, dtype=torch.bool)
    if mask_NT.shape != input_ids_NT.shape:
        raise ValueError(f"mask shape {tuple(mask_NT.shape)} != ids {tuple(input_ids_NT.shape)}")
    m = mask_NT.cpu().bool()
    return m[:, :-1] & m[:, 1:]


@torch.inference_mode()
def attribute(
    model: nn.Module,
    sae: SAE,
    site: str,
    layer: int,
    input_ids_NT: Tensor,
    mask_NT: Tensor | None = None,
    batch_size: int = 32,
) -> Attribution:
    """`logit_attribution` together with each feature's firing count on the same tokens."""
    last = len(get_blocks(model)) - 1
    names = hook_name(site, layer), hook_name("resid_post", last)
    sites = [(site, layer), ("resid_post", last)]
    norm, W_U_VD = final_norm(model), model.get_output_embeddings().weight
    dev, sae_dev = model_device(model), sae.W_dec.device
    keep_NT = _pair_mask(input_ids_NT, mask_NT)
    attrs, counts_F = [], torch.zeros(sae.d_sae, dtype=torch.long)
    for b0 in range(0, input_ids_NT.shape[0], batch_size):
        ids_BT, keep_BT = input_ids_NT[b0 : b0 + batch_size], keep_NT[b0 : b0 + batch_size]
        if not keep_BT.any():
            continue
        cache = run_with_cache(model, ids_BT.to(dev), sites)
        k = keep_BT.to(dev)
        x_tD, final_tD = cache[names[0]][:, :-1][k], cache[names[1]][:, :-1][k]
        frame = norm_frame(norm, final_tD)
        next_tD = W_U_VD[ids_BT[:, 1:].to(dev)[k]]
        f_tF = sae.encode(x_tD.to(sae_dev, sae.W_enc.dtype))
        attrs.append(direct_attribution(sae, frame, f_tF, final_tD, next_tD).float().cpu())
        counts_F += (f_tF > 0).sum(0).cpu()
    attr_TF = torch.cat(attrs) if attrs else torch.zeros(0, sae.d_sae)
    return Attribution(attr_TF, counts_F, attr_TF.shape[0])


def logit_attribution(
    model: nn.Module,
    sae: SAE,
    site: str,
    layer: int,
    input_ids_NT: Tensor,
    mask_NT: Tensor | None = None,
    batch_size: int = 32,
) -> Tensor:
    """Direct logit attribution [tokens, F] of every SAE feature to the actual next token.

    For token t (sequence n, position p) with next token y = ids[n, p + 1] and feature
    activation f_i(x_t) of the SAE at (site, layer):

        attr_i(t) = f_i(x_t) · (C(W_dec[i]) ⊙ γ) · W_U[y] / σ_t

    where the final norm (`models.final_norm`) is read as γ ⊙ C(r) / σ(r) + β on the last
    block's output r_t, with σ_t = sqrt(mean_d C(r_t)_d² + ε) frozen at the token's actual
    value: C subtracts the mean over dimensions for a LayerNorm (σ_t = sqrt(var + ε); the
    centring is part of the norm's linear map, so a decoder row along (1, .., 1) gets 0) and is
    the identity for an RMSNorm. γ is the norm's gain (1 + weight for Gemma), W_U [V, D] the
    output embedding (`model.get_output_embeddings().weight`). β, the output bias, logit
    soft-capping and the paths through later blocks are not part of a direct attribution.

    Rows are the tokens (n, p) with p < T - 1 where `mask_NT` (default: all) holds at both p
    and p + 1, in row-major order, so two models given the same ids and mask give aligned rows.
    """
    return attribute(model, sae, site, layer, input_ids_NT, mask_NT, batch_size).attr_TF


def transfer_quality(attr_a_TF: Tensor, attr_b_TF: Tensor, min_active: int = 10) -> Tensor:
    """Pearson correlation [F] over tokens between each feature's attribution in A and its
    twin's in B. NaN where a feature is active (attribution != 0) on fewer than `min_active`
    tokens in either model, or where either column is constant."""
    if attr_a_TF.shape != attr_b_TF.shape:
        shapes = f"{tuple(attr_a_TF.shape)} and {tuple(attr_b_TF.shape)}"
        raise ValueError(f"attribution shapes differ: {shapes}")
    a, b = attr_a_TF.double(), attr_b_TF.double().to(attr_a_TF.device)
    a, b = a - a.mean(0), b - b.mean(0)
    denom_F = (a.square().sum(0) * b.square().sum(0)).sqrt()
    r_F = (a * b).sum(0) / denom_F
    active = ((attr_a_TF != 0).sum(0) >= min_active) & ((attr_b_TF != 0).sum(0) >= min_active)
    ok = active.to(r_F.device) & (denom_F > 0)
    return torch.where(ok, r_F.clamp(-1.0, 1.0), torch.full_like(r_F, float("nan"))).float().cpu()


# ---------------------------------------------------------------------------------------------
# Structural consistency over content rewrites


def load_variants(path: str | Path) -> Tensor:
    """The variants file's `input_ids` as a LongTensor [G, V, T], sorted by group then variant
    (variant 0 = the original, 1.. its content rewrites)."""
    df = pl.read_parquet(path, columns=["group", "variant", "input_ids"]).sort("group", "variant")
    n_groups = df["group"].n_unique()
    if n_groups == 0 or len(df) % n_groups:
        raise ValueError(f"{path}: groups have different numbers of variants")
    n_var = len(df) // n_groups
    expected = np.tile(np.arange(n_var), n_groups)
    if not np.array_equal(df["variant"].to_numpy(), expected):
        raise ValueError(f"{path}: every group needs variants 0..{n_var - 1} exactly once")
    lengths = df["input_ids"].list.len().unique()
    if len(lengths) != 1:
        raise ValueError(f"{path}: sequences have different lengths {sorted(lengths.to_list())}")
    ids = np.asarray(df["input_ids"].to_list(), dtype=np.int64)
    return torch.from_numpy(ids).view(n_groups, n_var, -1)


def consistency_from_fires(fires_GVF: Tensor) -> Tensor:
    """Per feature [F], among groups whose original (variant 0) it fires on, the fraction of
    (group, rewrite) pairs whose rewrite it also fires on; NaN if it fires on no original.

    `fires_GVF` is bool: feature f fires anywhere in variant v of group g.
    """
    if fires_GVF.ndim != 3 or fires_GVF.shape[1] < 2:
        raise ValueError(f"expected fires [groups, variants >= 2, F], got {tuple(fires_GVF.shape)}")
    fires = fires_GVF.bool()
    orig_GF, rewrites_GRF = fires[:, 0], fires[:, 1:]
    kept_F = (orig_GF[:, None] & rewrites_GRF).sum((0, 1)).double()
    pairs_F = orig_GF.sum(0).double() * rewrites_GRF.shape[1]
    return torch.where(pairs_F > 0, kept_F / pairs_F.clamp_min(1), float("nan")).float()


@torch.inference_mode()
def variant_fires(
    sae: SAE,
    model: nn.Module,
    site: str,
    layer: int,
    variants_ids_GVT: Tensor,
    threshold: float = 0.0,
    mask_GVT: Tensor | None = None,
    batch_size: int = 32,
) -> Tensor:
    """Bool [G, V, F]: feature f's activation exceeds `threshold` on some token of variant v of
    group g (tokens where `mask_GVT`, default all, holds)."""
    G, V, T = variants_ids_GVT.shape
    ids_ST = variants_ids_GVT.reshape(G * V, T)
    mask_ST = (
        torch.ones(G * V, T, dtype=torch.bool) if mask_GVT is None else mask_GVT.reshape(G * V, T)
    )
    dev, sae_dev = model_device(model), sae.W_dec.device
    fires = []
    for s0 in range(0, G * V, batch_size):
        x_BTD = run_with_cache(model, ids_ST[s0 : s0 + batch_size].to(dev), [(site, layer)])[
            hook_name(site, layer)
        ]
        f_BTF = sae.encode(x_BTD.to(sae_dev, sae.W_enc.dtype))
        on_BTF = (f_BTF > threshold) & mask_ST[s0 : s0 + batch_size, :, None].to(sae_dev)
        fires.append(on_BTF.any(1).cpu())
    return torch.cat(fires).view(G, V, sae.d_sae)


def structural_consistency(
    sae: SAE,
    model: nn.Module,
    site: str,
    layer: int,
    variants_ids_GVT: Tensor,
    threshold: float = 0.0,
    mask_GVT: Tensor | None = None,
    batch_size: int = 32,
) -> Tensor:
    """Per feature [F]: among groups where it fires (activation > `threshold`) anywhere on the
    original (variant 0), the fraction of (group, rewrite) pairs where it also fires anywhere on
    the rewrite; NaN if it never fires on an original. See `consistency_from_fires`."""
    fires_GVF = variant_fires(
        sae, model, site, layer, variants_ids_GVT, threshold, mask_GVT, batch_size
    )
    return consistency_from_fires(fires_GVF)


def classify(consistency_F: Tensor, cut: float = 0.5) -> list[str]:
    """"structural" (consistency >= cut), "semantic" (< cut) or "inactive" (NaN) per feature."""
    return [
        "inactive" if math.isnan(c) else "structural" if c >= cut else "semantic"
        for c in consistency_F.tolist()
    ]


# ---------------------------------------------------------------------------------------------
# The table


def feature_class_table(
    model_a: nn.Module,
    model_b: nn.Module,
    sae_a: SAE,
    stitch: Stitch,
    site: str,
    layer_a: int,
    layer_b: int,
    input_ids_NT: Tensor,
    mask_NT: Tensor | None,
    variants_GVT: Tensor,
    *,
    min_active: int = 10,
    threshold: float = 0.0,
    cut: float = 0.5,
    variants_mask_GVT: Tensor | None = None,
    batch_size: int = 32,
) -> pl.DataFrame:
    """One row per feature of `sae_a` (an SAE of A at (site, layer_a)) and its twin in the SAE
    moved to B at (site, layer_b) by `transfer_sae(sae_a, stitch)`.

    Columns: `feature` (index), `quality` (`transfer_quality` of the logit attributions on
    `input_ids_NT`/`mask_NT`; NaN when too rarely active), `consistency`
    (`structural_consistency` of A's feature on `variants_GVT`), `class` (`classify` with
    `cut`), `frequency_a`, `frequency_b` (share of the attributed tokens on which the feature,
    or its twin, fires).
    """
    sae_b = transfer_sae(sae_a, stitch).to(sae_a.W_dec.device)
    att_a = attribute(model_a, sae_a, site, layer_a, input_ids_NT, mask_NT, batch_size)
    att_b = attribute(model_b, sae_b, site, layer_b, input_ids_NT, mask_NT, batch_size)
    quality_F = transfer_quality(att_a.attr_TF, att_b.attr_TF, min_active)
    consistency_F = structural_consistency(
        sae_a, model_a, site, layer_a, variants_GVT, threshold, variants_mask_GVT, batch_size
    )
    n = max(att_a.n_tokens, 1)
    return pl.DataFrame(
        {
            "feature": np.arange(sae_a.d_sae, dtype=np.int64),
            "quality": quality_F.double().numpy(),
            "consistency": consistency_F.double().numpy(),
            "class": classify(consistency_F, cut),
            "frequency_a": (att_a.fire_counts_F.double() / n).numpy(),
            "frequency_b": (att_b.fire_counts_F.double() / n).numpy(),
        }
    )


def class_summary(df: pl.DataFrame) -> dict[str, float]:
    """`{cls}/count`, `{cls}/mean_quality`, `{cls}/median_quality` for cls in structural and
    semantic. Only features with a quality (not NaN or null) count; no such feature gives
    count 0 and NaN mean and median."""
    out: dict[str, float] = {}
    for cls in SUMMARY_CLASSES:
        q = df.filter(pl.col("class") == cls)["quality"].fill_nan(None).drop_nulls()
        out[f"{cls}/count"] = float(len(q))
        q_np = q.to_numpy().astype(np.float64)
        out[f"{cls}/mean_quality"] = float(q_np.mean()) if len(q_np) else float("nan")
        out[f"{cls}/median_quality"] = float(np.median(q_np)) if len(q_np) else float("nan")
    return out
