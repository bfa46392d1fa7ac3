"""Layer matching: SVCCA and CKA against their invariances, and the toy models' layer matrices."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from raysae.stitching.matching import (
    best_matches,
    layer_similarity,
    linear_cka,
    principal_basis,
    svcca,
)
from raysae.toy import read_column_NS


def _data(n: int = 2000, d: int = 16, seed: int = 0) -> torch.Tensor:
    """Correlated, anisotropic data: a random mixing of unevenly scaled Gaussians."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen) * torch.linspace(0.2, 3.0, d)
    return z @ torch.randn(d, d, generator=gen) + 5.0


def _orthogonal(d: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q


def test_svcca_is_one_under_invertible_maps() -> None:
    x = _data()
    gen = torch.Generator().manual_seed(2)
    R = torch.randn(16, 16, generator=gen) + 4 * torch.eye(16)  # invertible, far from orthogonal
    c = torch.randn(16, generator=gen) * 10
    assert svcca(x, x @ R + c, keep=1.0) == pytest.approx(1.0, abs=1e-9)
    # With directions cut, rotations and isotropic scaling keep the same subspace.
    y = 3.0 * (x.double() @ _orthogonal(16)) - 7.0
    assert svcca(x, y) == pytest.approx(1.0, abs=1e-9)
    # Different widths: x embedded in a wider space by an injective map.
    wide = x @ torch.randn(16, 40, generator=gen)
    assert svcca(x, wide, keep=1.0) == pytest.approx(1.0, abs=1e-9)


def test_cka_is_one_under_rotation_and_scaling() -> None:
    x = _data()
    y = 0.1 * (x.double() @ _orthogonal(16)) + 2.0
    assert linear_cka(x, y) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)


def test_independent_data_is_dissimilar() -> None:
    x, y = _data(seed=3), _data(seed=4)
    assert 0.0 <= svcca(x, y) < 0.15
    assert 0.0 <= linear_cka(x, y) < 0.05
    # A partial relation sits in between.
    mixed = x[:, :8].double() @ torch.randn(8, 16, dtype=torch.float64) + y.double()
    assert svcca(x, y) < svcca(x, mixed) < 1.0


def test_principal_basis_keeps_the_variance_asked_for() -> None:
    # Three directions holding 90%, 9%, 1% of the variance (exactly, after centring).
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(500, 3, generator=gen, dtype=torch.float64))
    q = q - q.mean(0)
    q, _ = torch.linalg.qr(q)
    x = q * torch.tensor([0.90, 0.09, 0.01], dtype=torch.float64).sqrt()
    x = x @ _orthogonal(3)
    assert principal_basis(x, keep=0.85).shape == (500, 1)
    assert principal_basis(x, keep=0.95).shape == (500, 2)
    assert principal_basis(x, keep=0.995).shape == (500, 3)
    basis = principal_basis(x, keep=1.0)
    assert torch.allclose(basis.T @ basis, torch.eye(3, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="no variance"):
        principal_basis(torch.ones(10, 3))


def test_best_matches_reads_rows() -> None:
    sim = torch.tensor([[0.1, 0.9, 0.2], [0.8, float("nan"), 0.3]])
    assert best_matches(sim) == {0: 1, 1: 0}
    assert best_matches(sim, layers_a=[3, 5], layers_b=[2, 4, 6]) == {3: 4, 5: 2}
    with pytest.raises(ValueError, match="labels"):
        best_matches(sim, layers_a=[0])


@pytest.fixture(scope="module")
def toy(toy_pair):
    small = AutoModelForCausalLM.from_pretrained(toy_pair.small).eval()
    large = AutoModelForCausalLM.from_pretrained(toy_pair.large).eval()
    ids = read_column_NS(toy_pair.heldout)[:64]
    return small, large, ids, ids != small.config.bos_token_id  # special tokens out


@pytest.mark.parametrize("method", ["svcca", "cka"])
def test_a_model_matches_itself_layer_by_layer(toy, one_thread, method: str) -> None:
    small, _, ids, mask = toy
    sim = layer_similarity(small, small, ids, "resid_post", method=method, mask_NT=mask)
    n = small.config.num_hidden_layers
    assert sim.shape == (n, n)
    assert torch.allclose(sim.diagonal(), torch.ones(n, dtype=torch.float64), atol=1e-6)
    off = sim[~torch.eye(n, dtype=torch.bool)]
    assert (off < 0.999).all() and (off >= 0).all()
    assert best_matches(sim) == {i: i for i in range(n)}
    assert torch.allclose(sim, sim.T, atol=1e-9)


def test_small_against_large(toy, one_thread) -> None:
    small, large, ids, mask = toy
    sim = layer_similarity(
        small, large, ids, "resid_pre", mask_NT=mask, layers_a=[1, 2], max_rows=1500
    )
    assert sim.shape == (2, large.config.num_hidden_layers)
    assert ((sim >= 0) & (sim <= 1)).all()
    match = best_matches(sim, [1, 2])
    assert set(match) == {1, 2}
    assert set(match.values()) <= set(range(large.config.num_hidden_layers))
