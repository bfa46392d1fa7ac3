"""The SAE architectures: closed-form cases, gradients, and the SAELens folder format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import perturb
from safetensors.torch import load_file, save_file

from raysae import metrics
from raysae.architectures import ARCHITECTURES
from raysae.config import SAEConfig
from raysae.models import hook_name
from raysae.sae import (
    SAE,
    SAELoadError,
    SAEMetadata,
    geometric_median,
)
from raysae.sae_ops import _JumpReLU, _Step

ARCHS = ["relu", "topk", "jumprelu"]


pytestmark = pytest.mark.usefixtures("one_thread")


def build_sae(
    arch: str = "relu",
    d_in: int = 8,
    d_sae: int = 32,
    dtype: torch.dtype = torch.float32,
    **overrides: object,
) -> SAE:
    """A small SAE; keyword overrides go to SAEConfig."""
    fields: dict[str, object] = dict(architecture=arch, d_sae=d_sae, k=4) | overrides
    return SAE(SAEConfig(**fields), d_in, dtype=dtype)  # type: ignore[arg-type]


def reference_loss(sae: SAE, x_BD: torch.Tensor, coeff: float) -> torch.Tensor:
    """The loss written the obvious way (plain autograd, no fused kernels)."""
    pre = (x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc
    arch = sae.cfg.architecture
    if arch == "relu":
        f = pre.relu()
        penalty = (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    elif arch == "topk":
        vals, idx = pre.topk(sae.cfg.k, dim=-1)
        f = torch.zeros_like(pre).scatter(1, idx, vals.relu())
        penalty = pre.new_zeros(())
    else:
        eps = sae.cfg.jumprelu_bandwidth
        f = _JumpReLU.apply(pre, sae.threshold, eps)
        penalty = _Step.apply(pre, sae.threshold, eps).sum(-1).mean()
    recon = f @ sae.W_dec + sae.b_dec
    return (recon - x_BD).pow(2).sum(-1).mean() + coeff * penalty


def test_scratch_init_ties_encoder_to_unit_norm_decoder() -> None:
    sae = build_sae()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    assert torch.equal(build_sae().W_dec, sae.W_dec)  # the seed fixes the init


def test_sae_that_inverts_the_data_explains_all_variance() -> None:
    # f = [ReLU(x), ReLU(-x)] and x̂ = ReLU(x) - ReLU(-x) = x for every x.
    d = 8
    sae = build_sae("relu", d_in=d, d_sae=2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    x = torch.randn(256, d) * 3 + 1
    out = sae(x)
    torch.testing.assert_close(out.recon_BD, x)
    assert metrics.explained_variance(x, out.recon_BD) == pytest.approx(1.0, abs=1e-6)
    assert out.mse.item() == pytest.approx(0.0, abs=1e-10)


def test_topk_keeps_exactly_k_largest() -> None:
    sae = build_sae("topk", d_sae=64, k=5)
    with torch.no_grad():
        sae.b_enc.fill_(50.0)  # every pre-activation positive, so ReLU removes none of the k
    x = torch.randn(100, 8)
    feats = sae.encode(x)
    assert ((feats != 0).sum(-1) == 5).all()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    expected = pre.topk(5, dim=-1).indices.sort(-1).values
    got = (feats != 0).nonzero()[:, 1].reshape(100, 5)
    assert torch.equal(got, expected)


def test_topk_drops_negative_preactivations() -> None:
    sae = build_sae("topk", d_sae=64, k=5)
    with torch.no_grad():
        sae.b_enc.fill_(-50.0)
    assert not sae.encode(torch.randn(10, 8)).any()


@pytest.mark.parametrize("arch", ARCHS)
def test_train_forward_matches_plain_autograd(arch: str) -> None:
    """The fused training path gives the same loss and gradients as the obvious code."""
    sae = perturb(
        build_sae(arch, dtype=torch.float64, jumprelu_threshold=0.5, jumprelu_bandwidth=0.5)
    )
    x = torch.randn(64, 8, dtype=torch.float64)
    params = list(sae.parameters())
    ref = reference_loss(sae, x, 0.3)
    g_ref = torch.autograd.grad(ref, params)
    for out in (sae.train_forward(x, 0.3), sae(x, 0.3)):
        torch.testing.assert_close(out.loss, ref)
        for g, gr in zip(torch.autograd.grad(out.loss, params), g_ref):
            torch.testing.assert_close(g, gr)


@pytest.mark.parametrize("arch", ARCHS)
def test_fired_latents_match_dense_activations(arch: str) -> None:
    sae = perturb(build_sae(arch, jumprelu_threshold=0.5))
    x = torch.randn(16, 8)
    fired = sae.train_forward(x, 1.0).fired_F
    assert torch.equal(fired, (sae.encode(x) > 0).any(0))


def test_jumprelu_threshold_gets_gradient_from_both_terms() -> None:
    sae = build_sae("jumprelu", jumprelu_threshold=0.5, jumprelu_bandwidth=1.0)
    x = torch.randn(256, 8)
    mse_term = sae.train_forward(x, 0.0).loss
    (g_mse,) = torch.autograd.grad(mse_term, [sae.log_threshold])
    l0_term = sae.train_forward(x, 1.0).sparsity
    (g_l0,) = torch.autograd.grad(l0_term, [sae.log_threshold])
    assert (g_mse != 0).any() and (g_l0 != 0).any()
    assert (g_l0 <= 0).all()  # raising a threshold can only lower L0


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip(arch: str, tmp_path: Path) -> None:
    meta = SAEMetadata(
        model_name="tiny",
        hook_name=hook_name("resid_post", 3),
        context_size=16,
        prepend_bos=False,
        extras={"layer": 3},
    )
    sae = perturb(build_sae(arch, jumprelu_threshold=0.2))
    sae.metadata = meta
    x = torch.randn(32, 8)
    sae.save(tmp_path / "sae")
    loaded = SAE.load(tmp_path / "sae")
    assert loaded.cfg == sae.cfg and loaded.metadata == meta
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded(x).recon_BD, sae(x).recon_BD, rtol=0, atol=1e-6)
    if arch != "jumprelu":  # exp(log θ) may move θ by an ulp; everything else is bit-exact
        assert torch.equal(loaded(x).recon_BD, sae(x).recon_BD)


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_folder_has_saelens_layout(arch: str, tmp_path: Path) -> None:
    sae = build_sae(arch, d_in=8, d_sae=32)
    sae.metadata = SAEMetadata(
        model_name="m", hook_name="blocks.0.hook_resid_post", context_size=16, prepend_bos=True
    )
    sae.save(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (8, 32, "float32", "cpu")
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    assert cfg["metadata"]["context_size"] == 16 and cfg["metadata"]["prepend_bos"] is True
    assert ("k" in cfg) == (arch == "topk")
    tensors = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    expected = {"W_enc": [8, 32], "b_enc": [32], "W_dec": [32, 8], "b_dec": [8]}
    if arch == "jumprelu":
        expected["threshold"] = [32]
    assert shapes == expected


def test_save_replaces_existing_folder_atomically(tmp_path: Path) -> None:
    sae = build_sae()
    sae.save(tmp_path / "s")
    with torch.no_grad():
        sae.b_dec.fill_(7.0)
    sae.save(tmp_path / "s")
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temp or old folders left behind
    assert (SAE.load(tmp_path / "s").b_dec == 7.0).all()


def test_init_from_rejects_mismatched_shapes(tmp_path: Path) -> None:
    build_sae(d_in=8, d_sae=32).save(tmp_path / "s")
    with pytest.raises(SAELoadError, match=r"\(16, 32\).*\(8, 32\)"):
        SAE.init_from(tmp_path / "s", SAEConfig(d_sae=32), d_in=16)
    with pytest.raises(SAELoadError, match=r"\(8, 64\).*\(8, 32\)"):
        SAE.init_from(tmp_path / "s", SAEConfig(d_sae=64), d_in=8)
    with pytest.raises(SAELoadError, match="topk"):
        SAE.init_from(tmp_path / "s", SAEConfig(architecture="topk", d_sae=32, k=4), d_in=8)


def test_load_rejects_a_tensor_of_the_wrong_shape(tmp_path: Path) -> None:
    build_sae(d_in=8, d_sae=32).save(tmp_path / "s")
    weights = tmp_path / "s" / "sae_weights.safetensors"
    tensors = load_file(str(weights))
    tensors["b_dec"] = torch.zeros(9)
    save_file(tensors, str(weights))
    with pytest.raises(SAELoadError, match=r"b_dec has shape \[9\], expected \[8\]"):
        SAE.load(tmp_path / "s")


def test_load_rejects_a_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(SAELoadError, match="sae_weights.safetensors is missing"):
        SAE.load(tmp_path)


@pytest.mark.parametrize(("key", "value", "actual"), [("d_sae", 64, 32), ("d_in", 16, 8)])
def test_load_rejects_a_cfg_that_disagrees_with_its_weights(
    tmp_path: Path, key: str, value: int, actual: int
) -> None:
    build_sae(d_in=8, d_sae=32).save(tmp_path / "s")
    cfg_file = tmp_path / "s" / "cfg.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), key: value}))
    message = f"{cfg_file}: {key} is {value}, but sae_weights.safetensors has {key} {actual}"
    for load in (lambda: SAE.load(tmp_path / "s"),
                 lambda: SAE.init_from(tmp_path / "s", SAEConfig(d_sae=32), d_in=8)):
        with pytest.raises(SAELoadError) as e:
            load()
        assert message in str(e.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_rejects_non_finite_weights(tmp_path: Path, bad: float) -> None:
    build_sae().save(tmp_path / "s")
    weights = tmp_path / "s" / "sae_weights.safetensors"
    tensors = load_file(str(weights))
    tensors["W_dec"][3, :2] = bad
    save_file(tensors, str(weights))
    message = f"{weights}: tensor W_dec holds 2 NaN or infinite values of 256"
    with pytest.raises(SAELoadError) as e:
        SAE.load(tmp_path / "s")
    assert message in str(e.value)


def test_load_rejects_weights_that_are_not_safetensors(tmp_path: Path) -> None:
    build_sae().save(tmp_path / "s")
    weights = tmp_path / "s" / "sae_weights.safetensors"
    torch.save({"W_enc": torch.zeros(8, 32)}, weights)  # a pickle under the safetensors name
    with pytest.raises(SAELoadError) as e:
        SAE.load(tmp_path / "s")
    assert f"{weights}: not a readable safetensors file" in str(e.value)


def test_init_from_copies_weights_and_takes_new_hyperparameters(tmp_path: Path) -> None:
    src = perturb(build_sae("topk", k=4))
    src.save(tmp_path / "s")
    dst = SAE.init_from(tmp_path / "s", SAEConfig(architecture="topk", d_sae=32, k=6), d_in=8)
    assert dst.cfg.k == 6
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(dst, name), getattr(src, name))


def test_load_reads_a_plain_saelens_config(tmp_path: Path) -> None:
    """A folder written by SAELens itself (no raysae metadata) loads too."""
    sae = perturb(build_sae("topk", k=3))
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    cfg["metadata"] = {"hook_name": "blocks.1.hook_resid_post", "sae_lens_version": "6.5.0"}
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    loaded = SAE.load(tmp_path / "s")
    assert (loaded.cfg.architecture, loaded.cfg.k, loaded.d_sae) == ("topk", 3, 32)
    assert loaded.metadata.hook_name == "blocks.1.hook_resid_post"


def test_b_dec_init_methods() -> None:
    sae = build_sae()
    pts = torch.randn(200, 8) * 0.1
    pts[0] = 1000.0  # one outlier drags the mean but not the geometric median
    sae.init_b_dec(pts, "mean")
    torch.testing.assert_close(sae.b_dec, pts.mean(0))
    sae.init_b_dec(pts, "geometric_median")
    assert sae.b_dec.norm() < 0.1 < pts.mean(0).norm()
    sae.init_b_dec(pts, "zeros")
    assert not sae.b_dec.any()


def test_geometric_median_minimises_summed_distance() -> None:
    pts = torch.randn(300, 5, dtype=torch.float64) ** 3
    med = geometric_median(pts)

    def cost(y: torch.Tensor) -> float:
        return float((pts - y).norm(dim=1).sum())

    for _ in range(10):
        assert cost(med) <= cost(med + 1e-3 * torch.randn(5, dtype=torch.float64))


def test_normalize_decoder_gives_unit_rows() -> None:
    sae = perturb(build_sae())
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_relu_training_graph_allows_one_backward() -> None:
    # The fused ReLU backward reuses the saved activations as its mask (to save a [B, F] pass).
    sae = build_sae("relu")
    out = sae.train_forward(torch.randn(8, 8), 1.0)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


def _step_grads(arch: str, amp: bool, **cfg: object) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of one training forward (fp32 or under CPU bf16 autocast, as
    `SAELearner.loss` runs it), from the same SAE and batch."""
    torch.manual_seed(0)
    widths = {"matryoshka_widths": (64, 256)} if arch.startswith("matryoshka") else {}
    sae = build_sae(arch, d_in=64, d_sae=256, k=16, **widths, **cfg)
    x_BD = torch.randn(2048, 64)
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        sae.train_forward(x_BD, 1e-2).loss.backward()
    return {n: p.grad for n, p in sae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,theta", [
    *((a, None) for a in sorted(ARCHITECTURES) if a != "jumprelu"),
    *(("jumprelu", t) for t in (0.05, 0.1, 0.2, 0.5, 1.0)),
])
def test_bf16_autocast_keeps_every_gradient(arch: str, theta: float | None) -> None:
    """Under bf16 autocast every parameter's gradient points where fp32's does (cosine >= 0.99)
    and none is all zero where fp32's is not: JumpReLU's threshold too, whose straight-through
    window bf16 cannot resolve (it trains in float32; at θ >= 0.2 its gradient was exactly 0)."""
    cfg = {} if theta is None else {"jumprelu_threshold": theta}
    full, half = _step_grads(arch, False, **cfg), _step_grads(arch, True, **cfg)
    assert set(half) == set(full)
    for name, g in full.items():
        assert g.abs().sum() > 0 and half[name].abs().sum() > 0, name
        cos = torch.nn.functional.cosine_similarity(g.flatten().double(),
                                                    half[name].flatten().double(), dim=0)
        assert cos >= 0.99, (name, float(cos))
