"""Metric maths against closed forms and hand-computed values."""

from __future__ import annotations

import pytest
import torch

from raysae import metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_explained_variance_of_perfect_and_mean_reconstructions() -> None:
    x = torch.randn(500, 16) * 2 + 5
    assert metrics.explained_variance(x, x) == 1.0
    mean = x.to(torch.float64).mean(0).expand_as(x)
    assert metrics.explained_variance(x, mean) == pytest.approx(0.0, abs=1e-12)


def test_explained_variance_measures_variance_around_the_mean() -> None:
    # A constant offset in the data must not inflate the score (SAELens's old bug).
    x = torch.randn(1000, 8, dtype=torch.float64)
    noisy = x + 0.5 * torch.randn_like(x)
    ev = metrics.explained_variance(x, noisy)
    assert metrics.explained_variance(x + 100.0, noisy + 100.0) == pytest.approx(ev, abs=1e-9)


def test_explained_variance_accumulates_in_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(20_000, 32, generator=gen) * 0.1 + 50.0).float()
    recon = (x + 0.01 * torch.randn(x.shape, generator=gen)).float()
    acc = metrics.ExplainedVariance()
    for i in range(0, x.shape[0], 1024):
        acc.update(x[i : i + 1024], recon[i : i + 1024])
    x64, r64 = x.double(), recon.double()
    direct = 1 - (x64 - r64).pow(2).sum(-1).mean() / (
        x64.pow(2).sum(-1).mean() - x64.mean(0).pow(2).sum()
    )
    assert acc.compute() == pytest.approx(float(direct), abs=1e-9)
    assert acc.n == 20_000


def test_empty_accumulator_is_nan() -> None:
    assert metrics.ExplainedVariance().compute() != metrics.ExplainedVariance().compute()


def test_reconstruction_errors() -> None:
    x = torch.zeros(2, 4)
    r = torch.tensor([[1.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    assert metrics.mse(x, r) == pytest.approx((1 + 1 + 4) / 8)


def test_sparsity_counts() -> None:
    f = torch.tensor([[0.0, 1.0, -2.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    assert metrics.l0(f) == 1.5
    assert metrics.l1(f) == 3.0
    assert metrics.dead_fraction(torch.tensor([0, 5, 10, 20]), window_tokens=10) == 0.5
    assert metrics.dead_fraction_from_counts(torch.tensor([0, 3, 0, 1])) == 0.5
    counts = torch.tensor([0, 5, 11, 100])
    assert metrics.dense_fraction(counts, num_tokens=100, threshold=0.1) == 0.5


def test_ce_and_kl_scores() -> None:
    assert metrics.ces(ce_clean=2.0, ce_spliced=3.0, ce_zero=6.0) == pytest.approx(0.75)
    assert metrics.ces(2.0, 2.0, 6.0) == 1.0  # identity splice
    assert metrics.ces(2.0, 6.0, 6.0) == 0.0  # as bad as zero-ablation
    assert metrics.kl_score(kl_spliced=0.5, kl_zero=2.0) == pytest.approx(0.75)
