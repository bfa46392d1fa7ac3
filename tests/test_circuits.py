"""Task circuits: attribution patching against exact patching, faithfulness/completeness closed
forms and invariants, direct logit attribution summing to the logit difference."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_NEOX
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from raysae.config import SAEConfig
from raysae.features import circuits
from raysae.features.attribution import norm_frame
from raysae.features.tasks import TaskSet
from raysae.models import final_norm, hook_name, run_with_cache
from raysae.sae import SAE

LAST = TINY_NEOX["num_hidden_layers"] - 1


def tiny_model(linear_readout: bool = False) -> nn.Module:
    torch.manual_seed(0)
    cfg = dict(TINY_NEOX)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    if linear_readout:  # logits = W_U x: m is linear in the last block's output
        model.gpt_neox.final_layer_norm = nn.Identity()
    return model.eval()


def random_task(n: int = 6, t: int = 10, seed: int = 0) -> TaskSet:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, t + 1, (n,), generator=g)
    clean = torch.randint(3, TINY_NEOX["vocab_size"], (n, t), generator=g)
    clean[:, 0] = 0  # BOS
    counter = clean.clone()
    for i, L in enumerate(lengths.tolist()):
        counter[i, 1 + i % (L - 1)] = (clean[i, 1 + i % (L - 1)] + 7) % 125 + 3
        clean[i, L:] = counter[i, L:] = 2  # right padding
    correct = torch.randint(3, 128, (n,), generator=g)
    wrong = (correct + 11) % 125 + 3
    return TaskSet("rand", clean, counter, lengths, correct, wrong, pad_id=2)


def sae_for(model: nn.Module, layer: int, arch: str = "relu", seed: int = 0) -> SAE:
    cfg = SAEConfig(architecture=arch, expansion_factor=2, k=8)
    sae = SAE(cfg, TINY_NEOX["hidden_size"], seed=seed)
    ids = random_task(16, 10, seed=5).clean_NT
    x = run_with_cache(model, ids, [("resid_post", layer)])[hook_name("resid_post", layer)]
    sae.init_b_dec(x.flatten(0, 1))
    with torch.no_grad():  # a bias that leaves every feature some activity
        sae.b_enc.fill_(0.05)
    return sae


def test_resolve_n() -> None:
    # 2%-8% of 6144 = 122.88, 245.76, 368.64, 491.52: to the nearest count
    assert circuits.resolve_n([0.02, 0.04, 0.06, 0.08], 6144) == [123, 246, 369, 492]
    # the paper's own counts (its §2.3 says 368 for 6%) pass through as counts
    assert circuits.resolve_n([123, 246, 368, 492], 6144) == [123, 246, 368, 492]
    assert circuits.resolve_n([4, 36, 0.5, 100], 100) == [4, 36, 50, 100]
    with pytest.raises(ValueError, match=r"circuit size 101: a feature count above d_sae \(100\)"):
        circuits.resolve_n([4, 101], 100)  # never cut to d_sae
    assert circuits.resolve_n([0.001], 100) == [1]
    # half up, not Python's half-to-even: 6.5 -> 7, 2.5 -> 3
    assert circuits.resolve_n([0.05, 0.025], 130) == [3, 7]
    with pytest.raises(ValueError, match="circuit size -1"):
        circuits.resolve_n([-1], 10)


def test_splice_with_error_term_leaves_the_model_unchanged() -> None:
    model, task = tiny_model(), random_task()
    sae = sae_for(model, 1, "topk")
    mask = circuits.prompt_mask(task, [0])
    assert not mask[:, 0].any() and mask.sum() == (task.lengths_N - 1).sum()
    with torch.no_grad():
        plain = model(input_ids=task.clean_NT).logits
        spliced = circuits.run_with_features(model, sae, "resid_post", 1, task.clean_NT, mask)
        ablated = circuits.run_with_features(
            model, sae, "resid_post", 1, task.clean_NT, mask, lambda f, _r: torch.zeros_like(f)
        )
    torch.testing.assert_close(spliced, plain, atol=1e-4, rtol=1e-4)
    assert (ablated - plain).abs().max() > 1e-2  # an edit of f does reach the output


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_attribution_patching_is_exact_for_a_linear_readout(arch: str) -> None:
    model, task = tiny_model(linear_readout=True), random_task()
    sae = sae_for(model, LAST, arch)
    pat = circuits.attribution_patching(model, sae, "resid_post", LAST, task, [0], batch_size=4)
    feats = list(range(sae.d_sae))
    exact = circuits.exact_effects(model, sae, "resid_post", LAST, task, feats, [0], batch_size=4)
    assert pat.ie_NF.abs().max() > 1e-3
    torch.testing.assert_close(pat.ie_NF, exact, atol=2e-4, rtol=1e-3)
    # closed form: only the answer position reaches m, so IE_i = (f_cf - f)_i · W_dec[i] · u
    # there, with u = W_U[c] - W_U[w]
    W_U = model.get_output_embeddings().weight.detach()
    last = (torch.arange(len(task)), task.lengths_N - 1)
    with torch.no_grad():
        x = run_with_cache(model, task.clean_NT, [("resid_post", LAST)])[hook_name("resid_post", LAST)]
        xc = run_with_cache(model, task.counter_NT, [("resid_post", LAST)])[hook_name("resid_post", LAST)]
        f, fc = sae.encode(x[last]), sae.encode(xc[last])
        per_feature_NF = (W_U[task.correct_N] - W_U[task.wrong_N]) @ sae.W_dec.T
        closed = (fc - f) * per_feature_NF
    torch.testing.assert_close(pat.ie_NF, closed, atol=2e-4, rtol=1e-3)


def test_full_circuit_is_faithful_empty_is_not() -> None:
    model, task = tiny_model(), random_task()
    sae = sae_for(model, 1)
    pat = circuits.attribution_patching(model, sae, "resid_post", 1, task, [0])
    m = circuits.ablation_means(model, sae, "resid_post", 1, task, pat, [0, sae.d_sae], [0])
    with torch.no_grad():
        logits = model(input_ids=task.clean_NT).logits
    clean = task.logit_diff_N(logits).mean()
    assert m.model == pytest.approx(float(clean), abs=1e-4)
    assert abs(m.model - m.empty) > 1e-2
    faith = {n: circuits.normalised(v, m.model, m.empty) for n, v in m.circuit.items()}
    comp = {n: circuits.normalised(v, m.model, m.empty) for n, v in m.complement.items()}
    assert faith[sae.d_sae] == pytest.approx(1.0, abs=1e-5)
    assert faith[0] == pytest.approx(0.0, abs=1e-5)
    assert comp[sae.d_sae] == pytest.approx(0.0, abs=1e-5)
    assert comp[0] == pytest.approx(1.0, abs=1e-5)


def test_faithfulness_matches_its_closed_form_for_a_linear_readout() -> None:
    """m(edit) - m(M) = Σ_i (f'_i - f_i) W_dec[i]·u at the answer position: the per-example
    top-|IE| circuits and the mean ablation can be recomputed by hand."""
    model, task = tiny_model(linear_readout=True), random_task(n=8)
    sae = sae_for(model, LAST)
    pat = circuits.attribution_patching(model, sae, "resid_post", LAST, task, [0], batch_size=3)
    sizes, complement = [1, 5, 20], [2, 20]  # faithfulness and completeness: lists of their own
    m = circuits.ablation_means(model, sae, "resid_post", LAST, task, pat, sizes, [0], batch_size=3,
                                complement_sizes=complement)
    assert sorted(m.circuit) == sizes and sorted(m.complement) == complement
    W_U = model.get_output_embeddings().weight.detach()
    mask = circuits.prompt_mask(task, [0])
    with torch.no_grad():
        x = run_with_cache(model, task.clean_NT, [("resid_post", LAST)])[hook_name("resid_post", LAST)]
        f_NTF = sae.encode(x) * mask[..., None]
        mean_F = f_NTF.sum((0, 1)) / mask.sum()  # over every real position of every prompt
        w_NF = (W_U[task.correct_N] - W_U[task.wrong_N]) @ sae.W_dec.T
        # mean-ablating feature i on example n moves m by (mean_i - f_i) w_ni at its answer
        delta_NF = (mean_F - f_NTF[torch.arange(len(task)), task.lengths_N - 1]) * w_NF
    m_model = m.model
    assert m.empty == pytest.approx(m_model + float(delta_NF.sum(1).mean()), abs=1e-3)
    for n in sorted({*sizes, *complement}):
        top_Nn = pat.ie_NF.abs().topk(n, dim=1).indices
        in_c = torch.zeros_like(delta_NF, dtype=torch.bool).scatter(1, top_Nn, True)
        m_c = m_model + float((delta_NF * ~in_c).sum(1).mean())
        m_mc = m_model + float((delta_NF * in_c).sum(1).mean())
        if n in sizes:
            assert m.circuit[n] == pytest.approx(m_c, abs=1e-3)
        if n in complement:
            assert m.complement[n] == pytest.approx(m_mc, abs=1e-3)


def test_task_dla_sums_to_the_logit_difference() -> None:
    """With the SAE at the last block's output, m = Σ_i attr_i + the direct effect of b_dec and
    of the error term + β·u (the final LayerNorm read with σ frozen)."""
    model, task = tiny_model(), random_task()
    sae = sae_for(model, LAST)
    dla_NF = circuits.task_dla(model, sae, "resid_post", LAST, task, batch_size=4)
    with torch.no_grad():
        logits = model(input_ids=task.clean_NT).logits
        m_N = task.logit_diff_N(logits)
        x = run_with_cache(model, task.clean_NT, [("resid_post", LAST)])[hook_name("resid_post", LAST)]
        x_ND = x[torch.arange(len(task)), task.lengths_N - 1]
        rest_ND = x_ND - sae.decode(sae.encode(x_ND)) + sae.b_dec  # error + b_dec
        norm = final_norm(model)
        frame = norm_frame(norm, x_ND)
        W_U = model.get_output_embeddings().weight.detach()
        u_ND = (W_U[task.correct_N] - W_U[task.wrong_N]).double()
        rest_N = ((frame.centre(rest_ND) * frame.gamma_D) * u_ND).sum(1) / frame.scale(x_ND)
        beta_N = u_ND @ norm.bias.detach().double()
    torch.testing.assert_close(dla_NF.double().sum(1) + rest_N + beta_N, m_N.double(),
                               atol=1e-3, rtol=1e-4)
    assert (dla_NF != 0).any(1).all()


def test_evaluate_circuits_metrics_and_mean_over_tasks() -> None:
    model = tiny_model()
    sae = sae_for(model, 1, "topk")
    results = [
        circuits.evaluate_circuits(model, sae, "resid_post", 1, random_task(seed=s), [2, 8],
                                   [0], exact_check=4, batch_size=4, completeness_sizes=[4, 8])
        for s in (0, 1)
    ]
    names = set(results[0].metrics())
    assert names == {"circuit/rand/faithfulness/n2", "circuit/rand/faithfulness/n8",
                     "circuit/rand/completeness/n4", "circuit/rand/completeness/n8",
                     "circuit/rand/m_model", "circuit/rand/m_empty", "circuit/rand/atp_exact_corr",
                     "dla/rand/total", "dla/rand/mean_active"}
    # DLA: the sum over features, and the paper's feature average over the active ones
    for r in results:
        dla_NF = r.dla_NF.double()
        active_N = (dla_NF != 0).sum(1)
        assert (active_N > 0).all() and (active_N < sae.d_sae).all()
        assert r.dla_total == pytest.approx(float(dla_NF.sum(1).mean()), rel=1e-5)
        assert r.dla_mean_active == pytest.approx(float((dla_NF.sum(1) / active_N).mean()),
                                                  rel=1e-5)
    assert -1 <= results[0].atp_exact_corr <= 1
    mean = circuits.mean_over_tasks(results)
    f = [r.faithfulness[8] for r in results]
    assert mean["circuit/mean/faithfulness/n8"] == pytest.approx(sum(f) / 2)
    assert set(mean) == {k.replace("/rand/", "/mean/") for k in names}


def test_attribution_patching_tracks_exact_patching_on_the_toy_model(toy_pair, capsys) -> None:
    """On the trained toy model with an SAE trained on it: per task, IE_AtP of the features of
    largest |IE| against exact activation patching, over examples x features."""
    from raysae.features.tasks import load_tasks
    from raysae.toy import read_column_NS

    model = AutoModelForCausalLM.from_pretrained(toy_pair.small).eval()
    layer, site = 1, "resid_post"
    ids = read_column_NS(toy_pair.corpus)[:192]
    x = run_with_cache(model, ids, [(site, layer)])[hook_name(site, layer)][:, 1:].flatten(0, 1)
    sae = SAE(SAEConfig(architecture="topk", expansion_factor=4, k=8), x.shape[1], seed=0)
    sae.init_b_dec(x[:4096])
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = x[torch.randint(len(x), (512,), generator=g)]
        loss = sae(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ev = 1 - (sae(x).recon_BD - x).square().sum() / (x - x.mean(0)).square().sum()
    assert ev > 0.8
    corrs = {}
    for task in load_tasks(str(toy_pair.tasks), None, n_examples=24):
        pat = circuits.attribution_patching(model, sae, site, layer, task, [0, 1, 2])
        top = pat.ie_NF.abs().mean(0).argsort(descending=True)[:12].tolist()
        exact = circuits.exact_effects(model, sae, site, layer, task, top, [0, 1, 2])
        corrs[task.name] = circuits.pearson(pat.ie_NF[:, top], exact)
    with capsys.disabled():
        print(f"\nAtP vs exact patching (toy small, L{layer}, EV {float(ev):.3f}): "
              + ", ".join(f"{k} r={v:.3f}" for k, v in corrs.items()))
    assert min(corrs.values()) > 0.5
    assert sum(corrs.values()) / len(corrs) > 0.8


def test_circuit_feature_table_counts_every_example_circuit_once() -> None:
    model = tiny_model()
    sae = sae_for(model, 1, "topk")
    res = circuits.evaluate_circuits(model, sae, "resid_post", 1, random_task(), [3], [0])
    table = circuits.circuit_feature_table([res], 3)
    # each example's circuit holds exactly 3 features: the shares sum to 3
    assert sum(table["in_circuit"]) == pytest.approx(3.0)
    i = table["mean_abs_ie"].index(max(table["mean_abs_ie"]))
    f = table["feature"][i]
    assert table["mean_ie"][i] == pytest.approx(float(res.ie_NF[:, f].mean()))
    assert table["mean_dla"][i] == pytest.approx(float(res.dla_NF[:, f].mean()))


def test_normalised_is_undefined_when_the_features_carry_no_effect() -> None:
    assert circuits.normalised(3.0, 5.0, 1.0) == pytest.approx(0.5)
    assert circuits.normalised(3.0, 5.0, 1.0, min_effect=0.5) == pytest.approx(0.5)  # 4 > 2.5
    assert math.isnan(circuits.normalised(3.0, 5.0, 3.5, min_effect=0.5))  # 1.5 <= 2.5
    assert math.isnan(circuits.normalised(3.0, 5.0, 5.0))
    # an SAE whose decoder writes nothing: every effect goes through the error term
    model, task = tiny_model(), random_task()
    sae = sae_for(model, 1)
    with torch.no_grad():
        sae.W_dec.zero_()
    res = circuits.evaluate_circuits(model, sae, "resid_post", 1, task, [2], [0])
    assert res.m_empty == pytest.approx(res.m_model, abs=1e-5)
    assert math.isnan(res.faithfulness[2]) and math.isnan(res.completeness[2])
    assert "circuit/mean/faithfulness/n2" not in circuits.mean_over_tasks([res])
