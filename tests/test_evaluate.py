"""The spliced-model evaluation against its closed forms."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_NEOX

from raysae.config import ModelConfig, SAEConfig
from raysae.evaluate import evaluate_sae
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
