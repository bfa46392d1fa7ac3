"""Transfer scores against hand-computed values: transfer score (each part and the three
combined), token tables (the logit tokens read through the final norm), MMCS, nCES."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY_NEOX, build_cfg
from transformers import AutoConfig, AutoModelForCausalLM

from raysae.config import SAEConfig, SweepConfig, TrainConfig
from raysae.features.attribution import NormFrame, final_norm_frame
from raysae.sae import SAE
from raysae.transfer import scores
from raysae.transfer.derived import heldout_sites, new_normalized_ces, transfer_scores
from raysae.transfer.grid import expand
from raysae.transfer.scores import (
    combined_transfer_score,
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


def test_combined_score_pools_the_three_parts():
    top_a, top_b = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 2, 9], [9, 9, 9]])
    bot_a, bot_b = torch.tensor([[7, 8, 9], [1, 2, 3]]), torch.tensor([[7, 8, 9], [3, 0, 0]])
    max_a, max_b = torch.tensor([[5, 6, -1], [1, 2, 3]]), torch.tensor([[5, 0, -1], [1, 2, 3]])
    parts = [(top_a, top_b), (bot_a, bot_b), (max_a, max_b)]
    # feature 0 shares 2 + 3 + 1 of 9 tokens, feature 1 shares 0 + 1 + 3: (6/9 + 4/9) / 2
    assert combined_transfer_score(parts) == pytest.approx(10 / 18)
    # with K tokens in every part, the mean of the parts' scores (the paper's code: the three
    # shared counts of 10 tokens summed over 30)
    assert combined_transfer_score(parts) == pytest.approx(
        sum(transfer_score(a, b) for a, b in parts) / 3)
    # parts of different K weigh by their tokens: 2 of 3 and 1 of 1 shared -> 3/4
    one = [(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 4]])),
           (torch.tensor([[5]]), torch.tensor([[5]]))]
    assert combined_transfer_score(one) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="no token tables"):
        combined_transfer_score([])


def test_top_logit_tokens_read_through_the_final_norm_gain():
    W_U_DV = torch.eye(3)  # direction d writes token d
    W_dec_FD = torch.tensor([[1.0, 0.6, 0.0], [0.0, 0.3, 0.5]])
    assert top_logit_tokens(W_dec_FD, W_U_DV, 1).flatten().tolist() == [0, 2]
    # a gain that shrinks direction 0 and grows direction 1: [0.2, 0.6, 0] and [0, 0.6, 0.5]
    gain = NormFrame(torch.tensor([0.2, 2.0, 1.0], dtype=torch.float64), centred=False, eps=1e-5)
    assert top_logit_tokens(W_dec_FD, W_U_DV, 2, frame=gain).tolist() == [[1, 0], [1, 2]]
    assert top_logit_tokens(W_dec_FD, W_U_DV, 1, largest=False, frame=gain).flatten().tolist() == [
        2, 0]
    # through a real model's final LayerNorm: its weight, and the centring of each row
    torch.manual_seed(0)
    cfg = dict(TINY_NEOX)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    with torch.no_grad():
        model.gpt_neox.final_layer_norm.weight.uniform_(0.1, 3.0)
    frame = final_norm_frame(model)
    assert frame.centred
    torch.testing.assert_close(frame.gamma_D.float(), model.gpt_neox.final_layer_norm.weight)
    W_U = model.get_output_embeddings().weight.detach().T
    W_dec = torch.randn(32, TINY_NEOX["hidden_size"])
    through = ((W_dec - W_dec.mean(1, keepdim=True)) * frame.gamma_D.float()) @ W_U
    got = top_logit_tokens(W_dec, W_U, 5, frame=frame, chunk_rows=7)
    assert torch.equal(got, through.topk(5, dim=1).indices)
    assert not torch.equal(got, top_logit_tokens(W_dec, W_U, 5))  # the gain does reorder


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


# ---------------------------------------------------------------------------------------------
# What the sweep derives for a transfer SAE (`raysae.transfer.derived`), without Ray


def test_new_normalized_ces_only_for_steps_not_logged():
    ces = [(256, 0.6), (512, 0.75), (1024, 0.9)]
    assert new_normalized_ces(ces, {256}, 0.6, 0.9) == [(512, pytest.approx(0.5)),
                                                        (1024, pytest.approx(1.0))]
    assert new_normalized_ces(ces, {256, 512, 1024}, 0.6, 0.9) == []


def test_transfer_scores_of_an_sae_with_itself_are_one(tmp_path, token_file):
    """Held-out activations at each layer of the sweep, special tokens dropped; an SAE compared
    with itself on the same layer shares every token of every part."""
    job = build_cfg(tmp_path, token_file, train=TrainConfig(eval_tokens=128),
                    sweep=SweepConfig(layers=(0, 2), finetune_budgets=(8192,), offsets=(-2, 2),
                                      compute_plan=False))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_NEOX)).eval()
    acts, ids = heldout_sites(job, model, [0, 2])
    assert set(acts) == {0, 2} and acts[0].shape == (ids.shape[0], TINY_NEOX["hidden_size"])
    assert 0 < ids.shape[0] < 128 and not torch.isin(ids, torch.tensor([0, 1, 2])).any()  # BOS dropped
    sae = SAE(SAEConfig(architecture="topk", d_sae=32, k=4), TINY_NEOX["hidden_size"])
    trial = next(t for t in expand(job, job.sweep, "fp") if t.phase == "transfer" and t.layer == 2)
    assert trial.source_layer == 0
    W_U = model.get_output_embeddings().weight.detach().T
    same = transfer_scores(sae, sae, dataclasses.replace(trial, source_layer=2), W_U, (acts, ids))
    assert set(same) == {f"transfer_score/{p}" for p in
                         ("top_logits", "bottom_logits", "max_activating", "combined")}
    assert same["transfer_score/top_logits"] == same["transfer_score/bottom_logits"] == 1.0
    assert same["transfer_score/combined"] <= 1.0  # max-activating slots of dead features: -1
    other = transfer_scores(sae, sae, trial, W_U, (acts, ids))  # read on layers 0 and 2
    assert other["transfer_score/top_logits"] == 1.0  # logit tokens do not depend on the layer
    assert 0.0 <= other["transfer_score/max_activating"] <= 1.0
