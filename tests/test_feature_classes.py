"""Feature classes: logit attribution against the model's own logits, transfer quality,
structural consistency on exact fire patterns, and the feature-class table on the toy pair."""

from __future__ import annotations

import math

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from raysae.config import SAEConfig
from raysae.features.attribution import norm_frame
from raysae.models import final_norm, get_blocks, run_with_cache
from raysae.sae import SAE
from raysae.stitching.feature_classes import (
    CLASSES,
    class_summary,
    classify,
    consistency_from_fires,
    feature_class_table,
    load_variants,
    logit_attribution,
    structural_consistency,
    transfer_quality,
)
from raysae.stitching.stitch import Stitch
from raysae.toy import read_column_NS

NAN = float("nan")


def _scratch_sae(d_in: int, d_sae: int, seed: int = 0) -> SAE:
    return SAE(SAEConfig(architecture="relu", d_sae=d_sae), d_in, seed=seed)


def _identity_sae(d: int) -> SAE:
    """f = [relu(x), relu(-x)], decode(f) = x exactly: an SAE that hides nothing."""
    sae = _scratch_sae(d, 2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _identity_stitch(d: int) -> Stitch:
    eye, zero = torch.eye(d), torch.zeros(d)
    return Stitch(d, d).set_maps(eye, zero, eye, zero)


# ---------------------------------------------------------------------------------------------
# Pure functions


def test_transfer_quality_of_copies() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 4, generator=gen) * (torch.rand(200, 4, generator=gen) < 0.5)
    a[:, 2] = 0.0
    a[:3, 2] = 1.0  # active on 3 tokens only
    a[:, 3] = 0.0  # never active
    b = a.clone()
    b[:, 1] = -3.0 * a[:, 1] + 0.5  # anti-correlated twin (an offset does not matter)
    q = transfer_quality(a, b, min_active=5)
    assert q[0].item() == pytest.approx(1.0, abs=1e-6)
    assert q[1].item() == pytest.approx(-1.0, abs=1e-6)
    assert math.isnan(q[2].item()) and math.isnan(q[3].item())
    assert transfer_quality(a, b, min_active=3)[2].item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        transfer_quality(a, b[:, :2])


def test_consistency_counts_exactly() -> None:
    # 3 groups x (original + 2 rewrites) x 4 features.
    fires = torch.zeros(3, 3, 4, dtype=torch.bool)
    fires[:, :, 0] = True  # everywhere: 6 / 6
    fires[0, 0, 1] = fires[1, 0, 1] = True  # originals of groups 0 and 1 ...
    fires[0, 1, 1] = True  # ... kept by one of their 4 rewrites,
    fires[2, 1:, 1] = True  # rewrites of a group whose original it missed do not count
    fires[:, 1:, 2] = True  # never on an original: NaN
    fires[2, :, 3] = True  # one group, both rewrites: 2 / 2
    c = consistency_from_fires(fires)
    assert c[0].item() == 1.0 and c[1].item() == 0.25 and c[3].item() == 1.0
    assert math.isnan(c[2].item())
    assert classify(c) == ["structural", "semantic", "inactive", "structural"]
    assert classify(torch.tensor([0.5, 0.4999, NAN]), cut=0.5) == [
        "structural", "semantic", "inactive"
    ]
    with pytest.raises(ValueError, match="variants >= 2"):
        consistency_from_fires(fires[:, :1])


def test_class_summary_keys_and_nan_handling() -> None:
    df = pl.DataFrame({
        "feature": [0, 1, 2, 3, 4],
        "quality": [0.9, 0.7, NAN, 0.2, 0.5],
        "class": ["structural", "structural", "structural", "inactive", "inactive"],
    })
    s = class_summary(df)
    assert set(s) == {f"{c}/{k}" for c in ("structural", "semantic")
                      for k in ("count", "mean_quality", "median_quality")}
    assert s["structural/count"] == 2
    assert s["structural/mean_quality"] == pytest.approx(0.8)
    assert s["structural/median_quality"] == pytest.approx(0.8)
    assert s["semantic/count"] == 0
    assert math.isnan(s["semantic/mean_quality"]) and math.isnan(s["semantic/median_quality"])


class _GemmaLikeNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.1)
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


def test_norm_frame_reads_each_norm() -> None:
    x = torch.randn(50, 16) * 3 + 1
    ln = nn.LayerNorm(16)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(16))
        ln.bias.copy_(torch.randn(16))
    frame = norm_frame(ln, x)
    assert frame.centred and frame.eps == ln.eps
    assert torch.allclose(frame.gamma_D.float(), ln.weight)
    sigma = (x.double().var(-1, unbiased=False) + ln.eps).sqrt()
    assert torch.allclose(frame.scale(x), sigma)
    rms = nn.RMSNorm(16)  # eps=None: the dtype's epsilon
    with torch.no_grad():
        rms.weight.copy_(torch.randn(16))
    frame = norm_frame(rms, x)
    assert not frame.centred and torch.allclose(frame.gamma_D.float(), rms.weight)
    gemma = _GemmaLikeNorm(16)
    frame = norm_frame(gemma, x)
    assert not frame.centred and torch.allclose(frame.gamma_D.float(), 1 + gemma.weight)
    with pytest.raises(ValueError, match="neither a LayerNorm nor an RMSNorm"):
        norm_frame(nn.Tanh(), x)


def test_final_norm_paths() -> None:
    gpt2 = AutoModelForCausalLM.from_config(
        GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
    )
    assert final_norm(gpt2) is gpt2.transformer.ln_f
    with pytest.raises(ValueError, match="final norm of Linear"):
        final_norm(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# Attribution on real models


def _check_attribution_sums_to_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    """With an SAE on the final residual that reconstructs it exactly, the attributions of all
    features plus the norm's bias term add up to the model's own logit of the next token."""
    last = len(get_blocks(model)) - 1
    d = model.get_input_embeddings().weight.shape[1]
    attr = logit_attribution(model, _identity_sae(d), "resid_post", last, ids, mask)
    keep = mask[:, :-1] & mask[:, 1:]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    target = logits.gather(-1, ids[:, 1:, None])[..., 0][keep]
    W_U = model.get_output_embeddings().weight
    bias = getattr(final_norm(model), "bias", None)
    bias_term = W_U[ids[:, 1:][keep]] @ bias if bias is not None else torch.zeros_like(target)
    assert attr.shape == (int(keep.sum()), 2 * d)
    torch.testing.assert_close(attr.sum(1) + bias_term, target, rtol=1e-4, atol=1e-4)


def test_attribution_adds_up_to_logits_with_rmsnorm() -> None:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.randn(32))
    ids = torch.randint(3, 64, (3, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 5:] = False  # padding
    _check_attribution_sums_to_logits(model, ids, mask)


@pytest.fixture(scope="module")
def toy(toy_pair):
    small = AutoModelForCausalLM.from_pretrained(toy_pair.small).eval()
    large = AutoModelForCausalLM.from_pretrained(toy_pair.large).eval()
    ids = read_column_NS(toy_pair.heldout)[:24]
    variants = load_variants(toy_pair.variants)[:8]
    return small, large, ids, ids != small.config.bos_token_id, variants


def test_attribution_adds_up_to_logits_with_layernorm(toy, one_thread) -> None:
    small, _, ids, mask, _ = toy
    _check_attribution_sums_to_logits(small, ids[:8], mask[:8])


def test_attribution_matches_hand_computation(toy, one_thread) -> None:
    small, _, ids, mask, _ = toy
    ids, mask = ids[:6], mask[:6]
    sae = _scratch_sae(small.config.hidden_size, 24, seed=3)
    attr = logit_attribution(small, sae, "resid_post", 1, ids, mask)
    # By hand: the final norm's input from a hook on the norm itself, its statistics by torch.
    ln = small.gpt_neox.final_layer_norm
    seen = {}
    handle = ln.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0].detach()))
    with torch.no_grad():
        small(input_ids=ids)
    handle.remove()
    x = run_with_cache(small, ids, [("resid_post", 1)])["blocks.1.hook_resid_post"]
    keep = mask[:, :-1] & mask[:, 1:]
    f = sae.encode(x[:, :-1][keep]).detach()
    final = seen["x"][:, :-1][keep]
    sigma = (final.var(-1, unbiased=False) + ln.eps).sqrt()
    W_dec = sae.W_dec.detach()
    W_dec = W_dec - W_dec.mean(-1, keepdim=True)  # the LayerNorm's centring
    y = ids[:, 1:][keep]
    W_U = small.get_output_embeddings().weight.detach()
    expected = torch.stack([
        f[t] * ((W_dec * ln.weight.detach()) @ W_U[y[t]]) / sigma[t] for t in range(len(y))
    ])
    torch.testing.assert_close(attr, expected, rtol=1e-4, atol=1e-5)
    # A decoder row along (1, .., 1) is erased by the LayerNorm: no attribution at all.
    with torch.no_grad():
        sae.W_dec[0] = 1.0
    assert logit_attribution(small, sae, "resid_post", 1, ids, mask)[:, 0].abs().max() < 1e-5


def test_load_variants(toy_pair) -> None:
    v = load_variants(toy_pair.variants)
    rows = pq.read_table(toy_pair.variants).to_pylist()
    n_var = 1 + max(r["variant"] for r in rows)
    assert v.dtype == torch.long
    assert v.shape == (len(rows) // n_var, n_var, len(rows[0]["input_ids"]))
    for r in rows[:7]:
        assert v[r["group"], r["variant"]].tolist() == r["input_ids"]
    # Rewrites keep the template: originals and rewrites agree on part of the tokens only.
    same = (v[:, :1] == v[:, 1:]).float().mean().item()
    assert 0.2 < same < 1.0


def test_structural_consistency_of_always_and_never_firing_features(toy, one_thread) -> None:
    small, _, _, _, variants = toy
    sae = _scratch_sae(small.config.hidden_size, 3)
    with torch.no_grad():
        sae.W_enc[:, :2] = 0.0
        sae.b_enc[:2] = torch.tensor([1.0, -1.0])  # always on, never on
    c = structural_consistency(sae, small, "resid_post", 1, variants)
    assert c[0].item() == 1.0 and math.isnan(c[1].item())
    assert classify(c)[:2] == ["structural", "inactive"]


# ---------------------------------------------------------------------------------------------
# The table


def test_identity_stitch_transfers_every_feature_perfectly(toy, one_thread) -> None:
    small, _, ids, mask, variants = toy
    d = small.config.hidden_size
    sae = _scratch_sae(d, 64, seed=1)
    df = feature_class_table(small, small, sae, _identity_stitch(d), "resid_post", 1, 1, ids, mask,
                             variants)
    active = df.filter(pl.col("quality").is_not_nan())
    assert len(active) > 10
    assert (active["quality"] - 1.0).abs().max() < 1e-4
    assert df["frequency_a"].to_list() == pytest.approx(df["frequency_b"].to_list(), abs=1e-3)


def test_feature_class_table_on_the_toy_pair(toy, one_thread) -> None:
    small, large, ids, mask, variants = toy
    d_a, d_b = small.config.hidden_size, large.config.hidden_size
    sae = _scratch_sae(d_a, 96, seed=2)
    stitch = Stitch(d_a, d_b, seed=0)
    df = feature_class_table(small, large, sae, stitch, "resid_pre", 2, 1, ids, mask, variants,
                             min_active=5)
    assert df.columns == ["feature", "quality", "consistency", "class", "frequency_a",
                          "frequency_b"]
    assert df["feature"].to_list() == list(range(96))
    assert set(df["class"].unique()) <= set(CLASSES)
    q = df["quality"].fill_nan(None).drop_nulls()
    assert len(q) > 0 and q.min() >= -1 and q.max() <= 1
    freq = pl.concat([df["frequency_a"], df["frequency_b"]])
    assert freq.min() >= 0 and freq.max() <= 1
    inactive = df.filter(pl.col("class") == "inactive")
    assert inactive["consistency"].is_nan().all()
    summary = class_summary(df)
    assert len(summary) == 6 and summary["structural/count"] + summary["semantic/count"] <= len(q)
