"""Probes, sparse probes and steering through a stitch: closed forms, invariants, the toy pair."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raysae.config import ProbeConfig, SAEConfig
from raysae.models import hook_name, run_with_cache
from raysae.sae import SAE
from raysae.stitching.probes import (
    LabelledTokens,
    LinearProbe,
    accuracy,
    choose_strength,
    diff_of_means,
    fit_probe,
    generate,
    load_labelled,
    map_probe,
    probe_and_steer,
    random_probe,
    success_rate,
    target_tokens,
    top_class_mean_features,
)
from raysae.stitching.stitch import Stitch, lstsq_stitch
from raysae.toy import read_column_NS, topic_known_NS

SITE = "resid_post"


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs single-threaded (tiny tensors, a shared machine)."""


def _blobs(n_per: int, d: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K Gaussian blobs, then a huge offset and per-dimension scales from 1e-2 to 1e2."""
    gen = torch.Generator().manual_seed(seed)
    centres_KD = 6 * torch.randn(k, d, generator=torch.Generator().manual_seed(99))
    y_N = torch.arange(k).repeat_interleave(n_per)
    z_ND = centres_KD[y_N] + torch.randn(len(y_N), d, generator=gen)
    scale_D = torch.logspace(-2, 2, d)
    return 1000.0 + z_ND * scale_D, y_N


# ---------------------------------------------------------------------------------------------
# Probes


def test_fit_probe_separates_and_reads_raw_inputs() -> None:
    x_train, y_train = _blobs(200, 8, 3, seed=0)
    x_test, y_test = _blobs(200, 8, 3, seed=1)
    probe = fit_probe(x_train, y_train, 3)
    # The probe is x W + b on the raw (offset, badly scaled) inputs.
    pred_N = (x_test @ probe.W_DK + probe.b_K).argmax(-1)
    assert (pred_N == y_test).float().mean() > 0.95
    assert accuracy(probe, x_test, y_test) == float((pred_N == y_test).float().mean())
    # Deterministic: the same data gives the same probe.
    again = fit_probe(x_train, y_train, 3)
    assert torch.equal(again.W_DK, probe.W_DK) and torch.equal(again.b_K, probe.b_K)
    assert accuracy(random_probe(8, 3, seed=0), x_test, y_test) < 0.9


def test_mapped_probe_is_the_probe_of_the_down_map() -> None:
    gen = torch.Generator().manual_seed(3)
    d_a, d_b = 6, 10
    stitch = Stitch(d_a, d_b, seed=1)
    stitch.set_maps(stitch.P_up, torch.randn(d_b, generator=gen),
                    stitch.P_down, torch.randn(d_a, generator=gen))
    b_ND = torch.randn(300, d_b, generator=gen)
    a_ND = stitch.down(b_ND).detach()
    y_N = (a_ND[:, 0] > a_ND[:, 1]).long() + (a_ND[:, 2] > 0.5).long()
    probe = fit_probe(a_ND, y_N, 3)
    W_BK, c_K = map_probe(probe.W_DK, probe.b_K, stitch)
    with torch.no_grad():
        assert torch.allclose(b_ND @ W_BK + c_K, a_ND @ probe.W_DK + probe.b_K, atol=1e-5)
    mapped = LinearProbe(W_BK.detach(), c_K.detach())
    assert accuracy(mapped, b_ND, y_N) == accuracy(probe, a_ND, y_N) > 0.9


def test_top_class_mean_features_finds_planted_features() -> None:
    gen = torch.Generator().manual_seed(0)
    y_N = torch.randint(0, 3, (600,), generator=gen)
    feats_NF = torch.relu(torch.randn(600, 20, generator=gen))
    feats_NF[:, 3] += 3.0 * (y_N == 0)  # strongest
    feats_NF[:, 11] += 2.0 * (y_N == 1)
    feats_NF[:, 17] += 1.5 * (y_N != 2)  # marks class 2 by its absence
    idx = top_class_mean_features(feats_NF, y_N, 3, k=3)
    assert idx.tolist() == [3, 11, 17]
    assert top_class_mean_features(feats_NF, y_N, 3, k=1).tolist() == [3]
    with pytest.raises(ValueError, match="k=21"):
        top_class_mean_features(feats_NF, y_N, 3, k=21)


# ---------------------------------------------------------------------------------------------
# Steering building blocks


def test_diff_of_means_closed_form() -> None:
    mu0, mu1 = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([4.0, 0.0, -1.0])
    gen = torch.Generator().manual_seed(0)
    delta_MD = torch.randn(50, 3, generator=gen)
    # Points mu ± delta: each cluster's mean is exactly its centre.
    x_ND = torch.cat([mu0 + delta_MD, mu0 - delta_MD, mu1 + delta_MD, mu1 - delta_MD,
                      torch.full((7, 3), 1e3)])
    y_N = torch.cat([torch.zeros(100), torch.ones(100), torch.full((7,), -1)]).long()
    assert torch.allclose(diff_of_means(x_ND, y_N, 1), mu1 - mu0, atol=1e-5)
    assert torch.allclose(diff_of_means(x_ND, y_N, 0), mu0 - mu1, atol=1e-5)
    with pytest.raises(ValueError, match="class 2"):
        diff_of_means(x_ND, y_N, 2)


def test_target_tokens_on_a_hand_made_array() -> None:
    ids, labels = [], []

    def add(token: int, n_target: int, n_other: int, n_unlabelled: int = 0) -> None:
        ids.extend([token] * (n_target + n_other + n_unlabelled))
        labels.extend([2] * n_target + [0] * n_other + [-1] * n_unlabelled)

    add(5, 6, 0)  # pure, frequent: in
    add(6, 9, 1)  # exactly 90%: in
    add(7, 8, 2)  # 80%: out
    add(8, 4, 0)  # pure but rare: out
    add(1, 6, 0)  # pure but special: out
    add(9, 4, 0, n_unlabelled=6)  # unlabelled occurrences do not count: 4 < min_count
    add(4, 0, 6, n_unlabelled=30)  # another class
    ids_NS = torch.tensor(ids).view(1, -1)
    labels_NS = torch.tensor(labels).view(1, -1)
    assert target_tokens(ids_NS, labels_NS, 2, exclude=[0, 1]).tolist() == [5, 6]
    assert target_tokens(ids_NS, labels_NS, 0, exclude=[0, 1]).tolist() == [4]
    assert target_tokens(ids_NS, labels_NS, 2, purity=0.8, min_count=4).tolist() == [1, 5, 6, 7, 8, 9]


# ---------------------------------------------------------------------------------------------
# Loading labelled tokens


def _probe_cfg(source: Path | str, **overrides: object) -> ProbeConfig:
    return ProbeConfig(source=str(source), **{"num_rows": 32, "sparse_k": (1, 4),
                                              "steering_tokens": 6, **overrides})


@pytest.fixture(scope="module")
def tokenizer(toy_pair):
    return AutoTokenizer.from_pretrained(toy_pair.tokenizer)


@pytest.fixture(scope="module")
def models(toy_pair):
    small = AutoModelForCausalLM.from_pretrained(toy_pair.small).eval()
    large = AutoModelForCausalLM.from_pretrained(toy_pair.large).eval()
    return small, large


def test_load_labelled_applies_the_toy_rules(toy_pair, tokenizer) -> None:
    data = load_labelled(_probe_cfg(toy_pair.heldout, num_rows=20), tokenizer, 48)
    ids_NS = read_column_NS(toy_pair.heldout)[:20, :48]
    pos_NS = read_column_NS(toy_pair.heldout, "pos")[:20, :48]
    sent_pos_NS = read_column_NS(toy_pair.heldout, "sent_pos")[:20, :48]
    topic_NS = read_column_NS(toy_pair.heldout, "topic")[:20, :48]
    number_NS = read_column_NS(toy_pair.heldout, "number")[:20, :48]
    assert torch.equal(data.input_ids_NS, ids_NS)
    known_NS = topic_known_NS(pos_NS, sent_pos_NS) & (topic_NS >= 0)
    assert torch.equal(data.labels["topic"] >= 0, known_NS)
    assert torch.equal(data.labels["topic"][known_NS], topic_NS[known_NS])
    assert data.class_values["number"] == [1, 2] and data.n_classes["number"] == 2
    expected_number = torch.where(number_NS == 1, 0, torch.where(number_NS == 2, 1, -1))
    assert torch.equal(data.labels["number"], expected_number)
    assert torch.equal(data.labels["depth"] < 0, pos_NS == 0)
    assert data.n_classes["topic"] == 3


def test_load_labelled_names_a_missing_or_constant_column(toy_pair, tokenizer, tmp_path) -> None:
    with pytest.raises(ValueError, match="'sentiment'.*columns"):
        load_labelled(_probe_cfg(toy_pair.heldout, labels=("topic", "sentiment")), tokenizer, 32)
    with pytest.raises(ValueError, match="steering_label 'colour'"):
        load_labelled(_probe_cfg(toy_pair.heldout, steering_label="colour"), tokenizer, 32)
    path = tmp_path / "one_class.parquet"
    pq.write_table(pa.table({"text": ["a b"] * 6, "label": [3] * 6}), path)
    with pytest.raises(ValueError, match="'label'.*1 class.*expected at least 2"):
        load_labelled(_probe_cfg(path, labels=("label",), steering_label="label"), tokenizer, 8)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_load_labelled_per_text_labels(tokenizer, tmp_path, suffix) -> None:
    words = [w for w in tokenizer.get_vocab() if not w.startswith("<")][:8]
    texts = [" ".join(words[: n + 1]) for n in range(6)] + [words[0], " ".join(words)]
    sentiment = ["pos", "neg", "pos", None, "neg", "pos", "neg", "pos"]
    table = pa.table({"text": texts, "sentiment": sentiment})
    path = tmp_path / f"texts{suffix}"
    if suffix == ".parquet":
        pq.write_table(table, path)
    elif suffix == ".csv":
        table.to_pandas().to_csv(path, index=False)
    else:
        table.to_pandas().to_json(path, orient="records", lines=True)
    cfg = _probe_cfg(path, labels=("sentiment",), steering_label="sentiment", num_rows=7)
    data = load_labelled(cfg, tokenizer, context_length=5)

    assert data.input_ids_NS.shape == (7, 5)  # 7 rows taken, truncated to 5 tokens
    assert data.class_values["sentiment"] == ["neg", "pos"]
    lengths = [min(n + 2, 5) for n in range(6)] + [2]  # BOS + words, truncated
    assert data.row_lengths().tolist() == lengths
    y_NS = data.labels["sentiment"]
    for i, n in enumerate(lengths):
        assert data.input_ids_NS[i, 0] == tokenizer.bos_token_id
        assert (data.input_ids_NS[i, n:] == tokenizer.pad_token_id).all()
        expected = {"neg": 0, "pos": 1, None: -1}[sentiment[i]]
        assert y_NS[i, n - 1] == expected  # the label sits on the last real token
        assert (y_NS[i, : n - 1] == -1).all() and (y_NS[i, n:] == -1).all()


# ---------------------------------------------------------------------------------------------
# Through a stitch


def _identity_stitch(d: int) -> Stitch:
    eye = torch.eye(d)
    return Stitch(d, d).set_maps(eye, torch.zeros(d), eye, torch.zeros(d))


def _random_sae(d_in: int, d_sae: int) -> SAE:
    sae = SAE(SAEConfig(d_sae=d_sae), d_in, seed=0)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return sae


def test_identity_stitch_reads_a_as_a(toy_pair, tokenizer, models) -> None:
    small, _ = models
    cfg = _probe_cfg(toy_pair.heldout, labels=("topic", "number"))
    data = load_labelled(cfg, tokenizer, 48)
    d = small.config.hidden_size
    out = probe_and_steer(small, small, _identity_stitch(d), SITE, 1, 1, data, cfg,
                          {32: _random_sae(d, 32)}, tokenizer.all_special_ids)
    for label in ("topic", "number"):
        assert out[f"probe/{label}/a_on_b"] == out[f"probe/{label}/a_on_a"]
        assert out[f"probe/{label}/b_on_b"] == out[f"probe/{label}/a_on_a"]
    assert out["steering/a_mapped/strength"] == out["steering/b_own/strength"]
    assert out["steering/a_mapped/success"] == out["steering/b_own/success"]
    assert out["steering/cosine_a_mapped_b_own"] == pytest.approx(1.0, abs=1e-6)


@pytest.fixture(scope="module")
def pair_metrics(toy_pair, tokenizer, models) -> tuple[dict[str, float], LabelledTokens]:
    """probe_and_steer from the small model's layer 1 to the large model's, through a
    least-squares stitch fitted on the training rows."""
    small, large = models
    cfg = _probe_cfg(toy_pair.heldout, num_rows=64)
    data = load_labelled(cfg, tokenizer, 64)
    train_ids = data.input_ids_NS[:32]
    a = run_with_cache(small, train_ids, [(SITE, 1)])[hook_name(SITE, 1)].flatten(0, 1)
    b = run_with_cache(large, train_ids, [(SITE, 1)])[hook_name(SITE, 1)].flatten(0, 1)
    stitch = lstsq_stitch([(a, b)], a.shape[1], b.shape[1])
    saes = {16: _random_sae(a.shape[1], 16), 64: _random_sae(a.shape[1], 64)}
    cfg = dataclasses.replace(cfg, sparse_k=(1, 4, 20))
    out = probe_and_steer(small, large, stitch, SITE, 1, 1, data, cfg, saes,
                          tokenizer.all_special_ids)
    return out, data


def test_probe_and_steer_on_the_toy_pair(pair_metrics) -> None:
    out, _ = pair_metrics
    expected = set()
    for label in ("topic", "number", "depth"):
        expected |= {f"probe/{label}/{m}" for m in ("a_on_a", "a_on_b", "b_on_b", "random", "majority")}
        expected |= {f"sparse_probe/{label}/w{w}/k{k}/{m}" for w, k in
                     ((16, 1), (16, 4), (64, 1), (64, 4), (64, 20))  # k=20 > 16 is skipped
                     for m in ("a_on_a", "a_on_b", "b_on_b")}
    for v in ("b_own", "a_mapped", "random"):
        expected |= {f"steering/{v}/success", f"steering/{v}/strength"}
    expected |= {"steering/unsteered/success", "steering/cosine_a_mapped_b_own",
                 "steering/target_tokens"}
    assert set(out) == expected
    rates = {k: v for k, v in out.items() if not k.endswith(("strength", "cosine_a_mapped_b_own",
                                                             "target_tokens"))}
    assert all(0.0 <= v <= 1.0 for v in rates.values())

    majority = out["probe/topic/majority"]
    assert out["probe/topic/a_on_a"] > majority + 0.15
    assert out["probe/topic/b_on_b"] > majority + 0.15
    assert out["probe/topic/a_on_b"] > majority + 0.1  # the stitch carries the probe across
    assert out["probe/number/a_on_b"] > out["probe/number/majority"] + 0.05
    assert out["steering/b_own/success"] > out["steering/unsteered/success"] + 0.2
    assert out["steering/a_mapped/success"] > out["steering/unsteered/success"] + 0.2
    assert out["steering/cosine_a_mapped_b_own"] > 0.5
    assert out["steering/target_tokens"] >= 10  # a topic's words


def test_steering_the_small_model_toward_a_topic(toy_pair, tokenizer, models, pair_metrics) -> None:
    small, _ = models
    _, data = pair_metrics
    ids_NS, topic_NS = data.input_ids_NS, data.labels["topic"]
    keep_NS = topic_NS[:32] >= 0
    a_TD = run_with_cache(small, ids_NS[:32], [(SITE, 1)])[hook_name(SITE, 1)][keep_NS]
    v_D = diff_of_means(a_TD, topic_NS[:32][keep_NS], target=0)
    v_D = v_D / v_D.norm()
    target_ids = target_tokens(ids_NS, topic_NS, 0, exclude=tokenizer.all_special_ids)
    calib_NT, score_NT = ids_NS[32:48, :4], ids_NS[48:, :4]
    ref_norm = float(a_TD.norm(dim=1).mean())
    strength = choose_strength(small, calib_NT, SITE, 1, v_D, target_ids, scales=(0.5, 1, 2),
                               n_new=8, ref_norm=ref_norm)
    unsteered = success_rate(generate(small, score_NT, 8, SITE, 1), target_ids)
    steered = success_rate(generate(small, score_NT, 8, SITE, 1, v_D, strength), target_ids)
    assert steered > unsteered + 0.2
    # A zero-strength vector changes nothing.
    zero = generate(small, score_NT, 8, SITE, 1, v_D, 0.0)
    assert torch.equal(zero, generate(small, score_NT, 8, SITE, 1))
