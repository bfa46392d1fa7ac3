"""The spliced-model evaluation against its closed forms."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_NEOX

from raysae.config import ModelConfig, SAEConfig
from raysae.evaluate import (
    evaluate_sae,
    evaluate_saes,
    evaluate_saes_kept,
    read_zero_ablations,
    write_zero_ablations,
)
from raysae.models import load_lm
from raysae.sae import SAE


@pytest.fixture(scope="module")
def model():
    return load_lm(ModelConfig(name="tiny", from_config=TINY_NEOX))


def identity_sae(d: int) -> SAE:
    """relu(x) - relu(-x) = x: an SAE that reconstructs every input exactly."""
    sae = SAE(SAEConfig(architecture="relu", d_sae=2 * d), d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def tokens(n=6, t=16):
    ids = torch.randint(3, 128, (n, t))
    ids[:, 0] = 0  # BOS, excluded from the splice and the CE targets
    return ids


@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
def test_exact_sae_scores_one(model, site):
    r = evaluate_sae(model, identity_sae(64), site, 1, tokens(), special_ids=[0, 1, 2], batch_size=4)
    assert r.ces == pytest.approx(1.0, abs=1e-5)
    assert r.kl_score == pytest.approx(1.0, abs=1e-5)
    assert r.explained_variance == pytest.approx(1.0, abs=1e-6)
    assert r.ce_spliced == pytest.approx(r.ce_clean, abs=1e-5)
    assert r.kl_zero > 1e-4 and abs(r.ce_zero - r.ce_clean) > 1e-4  # zero-ablation changes the output
    assert r.l0 == pytest.approx(64, abs=0.01)  # every coordinate is non-zero in one half
    assert r.num_tokens == 6 * 15
    assert r.dead_fraction == 0.0


def test_zero_sae_scores_zero(model):
    sae = identity_sae(64)
    with torch.no_grad():
        sae.W_dec.zero_()
    r = evaluate_sae(model, sae, "resid_post", 0, tokens(), special_ids=[0, 1, 2])
    assert r.ces == pytest.approx(0.0, abs=1e-6)
    assert r.kl_score == pytest.approx(0.0, abs=1e-6)
    assert r.ce_spliced == pytest.approx(r.ce_zero, abs=1e-6)
    assert r.l2 == pytest.approx(r.mse * 64, rel=1e-6)


def test_noisy_sae_is_between(model):
    sae = identity_sae(64)
    with torch.no_grad():
        sae.W_dec.mul_(0.7)
    r = evaluate_sae(model, sae, "resid_post", 1, tokens(), special_ids=[0, 1, 2])
    assert 0.0 < r.ces < 1.0 and 0.0 < r.explained_variance < 1.0


def test_many_saes_in_one_pass_match_one_by_one(model):
    """The shared pass (one clean forward per batch, one zero-ablation per site) gives each
    SAE exactly what its own evaluation gives; the zero-ablations it computed are kept and a
    later call on the same tokens uses them instead of recomputing."""
    ids = tokens(n=10)
    saes = {f"s{i}": (SAE(SAEConfig(architecture="topk", d_sae=128, k=8), 64, seed=i), site, layer)
            for i, (site, layer) in enumerate([("resid_post", 0), ("resid_post", 1),
                                                ("resid_pre", 1), ("resid_post", 1)])}
    zero = {}
    together = evaluate_saes(model, saes, ids, [0, 1, 2], batch_size=4, zero_ablations=zero)
    assert set(zero) == {("resid_post", 0), ("resid_post", 1), ("resid_pre", 1)}
    assert zero[("resid_pre", 1)] == zero[("resid_post", 0)]  # the same stream
    for key, (sae, site, layer) in saes.items():
        alone = evaluate_sae(model, sae, site, layer, ids, [0, 1, 2], batch_size=4)
        assert together[key] == alone
    # a cached zero-ablation is used as given: the call does not recompute it
    zero[("resid_post", 1)] = (1e9, 1e6)
    again = evaluate_saes(model, saes, ids, [0, 1, 2], batch_size=4, zero_ablations=zero)
    assert again["s1"].ce_zero == 1e9 / (10 * 15)  # per target: 15 of each of the 10 rows
    assert again["s0"] == together["s0"]


def test_kept_zero_ablations_are_read_back(model, tmp_path):
    """The file keeps each site's zero-ablation: a second evaluation reads it (a value planted
    in the file is what the result shows) and adds only the sites it lacked."""
    ids = tokens()
    path = tmp_path / "eval" / "zero.json"
    sae = identity_sae(64)
    first = evaluate_saes_kept(path, model, {"a": (sae, "resid_post", 0)}, ids, [0, 1, 2])["a"]
    assert read_zero_ablations(path) == {("resid_post", 0): pytest.approx(
        (first.ce_zero * 6 * 15, first.kl_zero * 6 * 15))}
    write_zero_ablations(path, {("resid_post", 0): (1e9, 1.0)})
    both = evaluate_saes_kept(path, model, {"a": (sae, "resid_post", 0), "b": (sae, "resid_post", 1)},
                              ids, [0, 1, 2])
    assert both["a"].ce_zero == 1e9 / (6 * 15) and both["b"].ces == pytest.approx(1.0, abs=1e-5)
    assert set(read_zero_ablations(path)) == {("resid_post", 0), ("resid_post", 1)}


def test_matryoshka_prefixes_are_evaluated_each(model):
    """A Matryoshka SAE reports every prefix's MSE and explained variance; the whole
    dictionary's prefix is the SAE itself, and no other architecture gains entries."""
    exact = identity_sae(64)
    sae = SAE(SAEConfig(architecture="matryoshka_batchtopk", d_sae=128, k=8,
                        matryoshka_widths=(64, 128)), 64)
    with torch.no_grad():  # the first half alone passes the positive part, both halves all of x
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sae, name).copy_(getattr(exact, name))
    r = evaluate_sae(model, sae, "resid_post", 1, tokens(), special_ids=[0, 1, 2]).as_dict()
    assert r["mse_prefix_128"] == pytest.approx(r["mse"]) and r["mse"] < 1e-10
    assert r["explained_variance_prefix_128"] == pytest.approx(r["explained_variance"])
    assert 0.0 < r["explained_variance_prefix_64"] < 0.9 and r["mse_prefix_64"] > 100 * r["mse"]
    plain = evaluate_sae(model, exact, "resid_post", 1, tokens(), special_ids=[0, 1, 2])
    assert not any("prefix" in k for k in plain.as_dict())
