"""Transfer scores against hand-computed values: transfer score, token tables, MMCS, nCES."""

from __future__ import annotations

import pytest
import torch

from raysae.config import SAEConfig
from raysae.sae import SAE
from raysae.transfer import scores
from raysae.transfer.scores import (
    max_activating_tokens,
    mmcs,
    normalized_ces,
    top_logit_tokens,
    transfer_score,
)


def test_transfer_score_identical_disjoint_partial():
    a = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert transfer_score(a, a) == 1.0
    assert transfer_score(a, a.flip(1)) == 1.0  # order within a row does not matter
    assert transfer_score(a, a + 10) == 0.0
    # row 0 shares {1, 3} (2/3), row 1 shares nothing but row 0's ids (0/3): mean 1/3
    b = torch.tensor([[3, 9, 1], [1, 2, 3]])
    assert transfer_score(a, b) == pytest.approx(1 / 3)


def test_transfer_score_padding_and_repeats():
    pad = torch.full((2, 3), -1)
    assert transfer_score(pad, pad) == 0.0  # features that never fire never match
    a = torch.tensor([[7, 7, 8]])
    assert transfer_score(a, torch.tensor([[7, 9, 9]])) == pytest.approx(1 / 3)
    assert transfer_score(a, torch.tensor([[7, 7, 9]])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shape"):
        transfer_score(a, torch.zeros(1, 2, dtype=torch.long))


def test_top_logit_tokens():
    W_U_DV = torch.eye(2, 5)  # direction 0 -> token 0, direction 1 -> token 1
    W_U_DV[0, 3] = 0.5
    W_U_DV[1, 4] = -2.0
    W_dec_FD = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # feature 0 logits: [1, 0, 0, .5, 0]; feature 1: [0, 1, 0, 0, -2]
    top = top_logit_tokens(W_dec_FD, W_U_DV, 2, chunk_rows=1)
    assert top.dtype == torch.long
    assert top[0].tolist() == [0, 3] and top[1, 0] == 1  # feature 1's runner-up is a 0-tie
    bottom = top_logit_tokens(W_dec_FD, W_U_DV, 1, largest=False)
    assert bottom[1].tolist() == [4]


def test_max_activating_tokens():
    token_ids_N = torch.tensor([5, 6, 5, 7, 8])
    feats_NF = torch.tensor(
        [
            [1.0, 0.0, 0.0],
            [0.5, 0.0, 2.0],
            [3.0, 0.0, 0.0],  # feature 0's best position: token 5 again
            [0.2, 0.0, 0.0],
            [0.0, 0.0, 1.0],
        ]
    )
    top = max_activating_tokens(feats_NF, token_ids_N, 3, chunk_elems=8)
    assert top.tolist() == [[5, 6, 7], [-1, -1, -1], [6, 8, -1]]  # distinct tokens, best first
    assert transfer_score(top, top) == pytest.approx((1 + 0 + 2 / 3) / 3)
    # k beyond the vocabulary seen: padded with -1
    assert max_activating_tokens(feats_NF, token_ids_N, 10)[1].tolist() == [-1] * 10


def test_mmcs_self_and_permutation():
    sae = SAE(SAEConfig(d_sae=16), d_in=8)
    W = sae.W_dec.detach()
    assert mmcs(W, W) == pytest.approx(1.0, abs=1e-6)
    perm = torch.randperm(16)
    assert mmcs(W, W[perm]) == pytest.approx(1.0, abs=1e-6)
    assert mmcs(W[perm] * 3.0, W, chunk_rows=5) == pytest.approx(1.0, abs=1e-6)  # scale-free
    # orthogonal dictionaries: every best match is 0
    assert mmcs(torch.eye(4)[:2], torch.eye(4)[2:]) == pytest.approx(0.0)


def test_mmcs_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0]])  # 45 degrees from both rows of a
    assert mmcs(a, b) == pytest.approx(2**-0.5)
    assert mmcs(b, a) == pytest.approx(2**-0.5)


def test_normalized_ces_hand_computed():
    # zero-shot SAE_j gets 0.6 on layer i, scratch SAE_i 0.9, the transfer 0.84: 0.24/0.3
    assert normalized_ces(0.84, 0.6, 0.9) == pytest.approx(0.8)
    assert normalized_ces(0.9, 0.6, 0.9) == pytest.approx(1.0)
    assert normalized_ces(0.6, 0.6, 0.9) == pytest.approx(0.0)
    assert normalized_ces(0.95, 0.6, 0.9) > 1  # better than scratch, as in Table 3


def test_normalized_ces_by_hand() -> None:
    # transfer 0.90, zero-shot 0.50, scratch 0.95: (0.90 - 0.50) / (0.95 - 0.50) = 0.4 / 0.45
    assert scores.normalized_ces(0.90, 0.50, 0.95) == pytest.approx(8 / 9)
    assert scores.normalized_ces(0.95, 0.50, 0.95) == pytest.approx(1.0)
    assert scores.normalized_ces(0.50, 0.50, 0.95) == 0.0


def test_mmcs_of_decoder_with_itself_and_a_permutation() -> None:
    W = torch.randn(300, 16)
    assert scores.mmcs(W, W) == pytest.approx(1.0, abs=1e-6)
    assert scores.mmcs(W, W[torch.randperm(300)] * 3.0) == pytest.approx(1.0, abs=1e-6)


def test_mmcs_chunking_and_asymmetry() -> None:
    W, V = torch.randn(50, 8), torch.randn(70, 8)
    full = scores.mmcs(W, V, chunk_rows=1000)
    assert scores.mmcs(W, V, chunk_rows=7) == pytest.approx(full, abs=1e-6)
    cos = torch.nn.functional.normalize(W, dim=1) @ torch.nn.functional.normalize(V, dim=1).T
    assert full == pytest.approx(float(cos.max(1).values.mean()), abs=1e-6)
    # Orthogonal dictionaries share nothing.
    eye = torch.eye(8)
    assert scores.mmcs(eye[:4], eye[4:]) == pytest.approx(0.0, abs=1e-7)


def test_mmcs_rejects_different_widths() -> None:
    with pytest.raises(ValueError, match="width 8 and 9"):
        scores.mmcs(torch.randn(4, 8), torch.randn(4, 9))
