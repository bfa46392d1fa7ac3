"""The stitch core: closed forms and invariants of the affine maps and what they carry."""

from __future__ import annotations

import json

import pytest
import torch

from raysae.checkpoint import load_train_state, save_train_state
from raysae.config import ConfigError, ModelConfig, SAEConfig, StitchConfig
from raysae.models import load_lm
from raysae.sae import SAE
from raysae.stitching.evaluate import evaluate_stitch
from raysae.stitching.stitch import (
    Lstsq,
    Stitch,
    cosine_lr,
    lstsq_flops,
    lstsq_stitch,
    map_probe,
    map_steering,
    stitch_flops_per_token,
    train_stitch,
    transfer_sae,
)
from tests.conftest import TINY_NEOX


def build_stitch_cfg(**overrides: object) -> StitchConfig:
    """A StitchConfig for the training loop (B and the pairs are placeholders it never reads)."""
    fields: dict[str, object] = dict(large=ModelConfig(name="b"), pairs=((0, 0),))
    return StitchConfig(**(fields | overrides))  # type: ignore[arg-type]


def affine_pair(n: int = 4096, d: int = 12, seed: int = 0):
    """A's activations (correlated, offset) and their exact affine image B = A M + c."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g) @ (torch.eye(d) + 0.5 * torch.randn(d, d, generator=g) / d**0.5) + 3.0
    M = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    c = torch.randn(d, generator=g)
    return a, a @ M + c, M, c


def batches(a: torch.Tensor, b: torch.Tensor, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(a), generator=g)
        for s in range(0, len(a) - size + 1, size):
            yield a[perm[s : s + size]], b[perm[s : s + size]]


def identity_stitch(d: int) -> Stitch:
    eye, zero = torch.eye(d), torch.zeros(d)
    return Stitch(d, d).set_maps(eye, zero, eye, zero)


def test_lstsq_recovers_an_exact_affine_image():
    a, b, M, c = affine_pair()
    it = batches(a, b, 512)
    st = lstsq_stitch((next(it) for _ in range(8)), 12, 12)
    assert torch.allclose(st.P_up, M, atol=1e-3) and torch.allclose(st.b_up, c, atol=1e-3)
    M_inv = torch.linalg.inv(M)
    assert torch.allclose(st.P_down, M_inv, atol=1e-3)
    assert torch.allclose(st.b_down, -c @ M_inv, atol=1e-3)


def test_joint_training_recovers_the_map_from_random_init(one_thread):
    a, _, M, c = affine_pair(d=8)
    a = a - a.mean(0)  # centred inputs: plain gradient descent is slow on a large mean offset
    b = a @ M + c
    st = Stitch(8, 8, seed=3)
    settings = build_stitch_cfg(num_tokens=256 * 1500, batch_size=256, lr=3e-2)
    losses = []
    train_stitch(st, settings, batches(a, b, 256), log_every_steps=100,
                 on_metrics=lambda t, m: losses.append(m["loss"]))
    assert losses[-1] < 1e-6 * losses[0]
    assert torch.allclose(st.P_up, M, atol=1e-3) and torch.allclose(st.b_up, c, atol=1e-3)
    M_inv = torch.linalg.inv(M)
    assert torch.allclose(st.P_down, M_inv, atol=1e-3)
    assert torch.allclose(st.b_down, -c @ M_inv, atol=1e-3)


def test_training_from_the_lstsq_fit_starts_and_ends_at_the_exact_map(one_thread):
    a, b, M, _ = affine_pair(d=8)
    it = batches(a, b, 256)
    st = lstsq_stitch((next(it) for _ in range(4)), 8, 8)
    assert st.loss(a, b, 1.0).total.item() < 1e-8
    settings = build_stitch_cfg(num_tokens=256 * 200, batch_size=256, lr=1e-3)
    train_stitch(st, settings, it)  # Adam's first steps wander by ~lr; the decay brings it back
    assert st.loss(a, b, 1.0).total.item() < 1e-4
    assert torch.allclose(st.P_up, M, atol=1e-2)


def test_loss_terms_vanish_exactly_at_an_invertible_map():
    a, b, M, c = affine_pair(n=256)
    M_inv = torch.linalg.inv(M)
    st = Stitch(12, 12).set_maps(M, c, M_inv, -c @ M_inv)
    loss = st.loss(a, b, alpha=1.0)
    assert loss.total.item() < 1e-6
    off = Stitch(12, 12).set_maps(M, c + 1.0, M_inv, -c @ M_inv)
    # a unit bias error costs exactly 1 in MSE(T↑A, B) and in the B-side cycle term
    terms = off.loss(a, b, alpha=0.5)
    assert terms.up.item() == pytest.approx(1.0, rel=1e-4)
    assert terms.total.item() == pytest.approx(
        (terms.up + terms.down + 0.5 * (terms.cycle_a + terms.cycle_b)).item(), rel=1e-6
    )


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_transfer_through_identity_leaves_the_sae_unchanged(arch):
    sae = SAE(SAEConfig(architecture=arch, d_sae=48, k=6), 16, seed=1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = transfer_sae(sae, identity_stitch(16))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(out, name), getattr(sae, name), atol=1e-6), name
    x = torch.randn(32, 16)
    assert torch.equal(out.encode(x) != 0, sae.encode(x) != 0)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_transfer_through_an_invertible_map_preserves_reconstructions(arch):
    a, b, M, c = affine_pair(n=128)
    M_inv = torch.linalg.inv(M)
    st = Stitch(12, 12).set_maps(M, c, M_inv, -c @ M_inv)
    sae = SAE(SAEConfig(architecture=arch, d_sae=40, k=5), 12, seed=2)
    with torch.no_grad():
        sae.b_dec.copy_(a.mean(0))
        sae.b_enc.add_(0.05 * torch.randn(40))
    moved = transfer_sae(sae, st)
    # the same features on B's image of A's activations, and the reconstruction is its image
    assert torch.allclose(moved.encode(b), sae.encode(a), atol=1e-3)
    recon_a = sae.decode(sae.encode(a))
    assert torch.allclose(moved.decode(moved.encode(b)), recon_a @ M + c, atol=1e-3)
    # in closed form, for any stitch (not only invertible ones)
    st2 = Stitch(12, 20, seed=5)
    moved2 = transfer_sae(sae, st2)
    x_b = torch.randn(64, 20)
    assert torch.allclose(moved2.encode(x_b), sae.encode(st2.down(x_b)), atol=1e-4)
    f = sae.encode(a[:64])
    assert torch.allclose(moved2.decode(f), st2.up(sae.decode(f)), atol=1e-4)


def test_probe_mapping_equals_the_composed_linear_map():
    st = Stitch(10, 14, seed=1)
    with torch.no_grad():
        st.b_down.normal_()
    W, c = torch.randn(10, 3), torch.randn(3)
    W_b, c_b = map_probe(W, c, st)
    x_b = torch.randn(50, 14)
    assert torch.allclose(x_b @ W_b + c_b, st.down(x_b) @ W + c, atol=1e-5)


def test_steering_mapping_is_the_bias_free_up_map_renormalised():
    st = Stitch(10, 14, seed=1)
    v = torch.randn(10)
    u = map_steering(v, st)
    assert u.norm().item() == pytest.approx(1.0, abs=1e-6)
    expected = st.up(v) - st.up(torch.zeros(10))  # the difference of two points loses the bias
    assert torch.allclose(u, expected / expected.norm(), atol=1e-6)


def test_save_load_round_trip_and_errors(tmp_path):
    st = Stitch(6, 9, seed=4, meta={"layer_a": 1, "layer_b": 2})
    st.save(tmp_path / "s")
    back = Stitch.load(tmp_path / "s")
    assert back.meta["layer_b"] == 2
    for name, p in st.state_dict().items():
        assert torch.equal(p, back.state_dict()[name])
    assert json.loads((tmp_path / "s" / "stitch.json").read_text())["convention"] == "row"
    with pytest.raises(FileNotFoundError, match="stitch.json"):
        Stitch.load(tmp_path)


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path, one_thread):
    a, b, _, _ = affine_pair(d=8)
    settings = build_stitch_cfg(num_tokens=64 * 40, batch_size=64, lr=1e-2,
                                checkpoint_every_tokens=64 * 16, lr_warmup_frac=0.1)
    full = Stitch(8, 8, seed=0)
    train_stitch(full, settings, batches(a, b, 64))
    states = []
    first = Stitch(8, 8, seed=0)
    train_stitch(first, settings, batches(a, b, 64), on_checkpoint=states.append)
    assert [s.tokens_seen for s in states] == [1024, 2048, 2560]
    save_train_state(states[0], tmp_path / "state")
    state = load_train_state(tmp_path / "state")
    resumed = Stitch(8, 8, seed=9)
    rest = batches(a, b, 64)
    for _ in range(state.step):
        next(rest)
    train_stitch(resumed, settings, rest, start_state=state)
    for name, p in full.state_dict().items():
        assert torch.equal(p, resumed.state_dict()[name]), name


def test_cosine_schedule_and_flops():
    s = build_stitch_cfg(num_tokens=1000, batch_size=10, lr=1.0, lr_warmup_frac=0.1)
    assert cosine_lr(0, 100, s) == pytest.approx(0.1)
    assert cosine_lr(9, 100, s) == pytest.approx(1.0)
    assert cosine_lr(10, 100, s) == pytest.approx(1.0)
    assert cosine_lr(55, 100, s) == pytest.approx(0.5)
    assert cosine_lr(99, 100, s) < 1e-3
    st = Stitch(8, 12)
    assert stitch_flops_per_token(st, torch.randn(32, 8), torch.randn(32, 12)) == 20 * 8 * 12


def test_lstsq_flops_are_the_hand_count_and_recorded_rows():
    # 10 rows, d_a = 2, d_b = 3: per row xᵀx and xᵀy of both maps, 2(2² + 2·3) + 2(3² + 3·2) =
    # 50 = 2(2 + 3)²; solves: (2/3)·2³ + 2·2²·3 = 16/3 + 24 for the up map, (2/3)·3³ + 2·3²·2 =
    # 18 + 36 for the down map
    assert lstsq_flops(10, 2, 3) == pytest.approx(10 * 50 + 16 / 3 + 24 + 18 + 36)
    from torch.utils.flop_counter import FlopCounterMode

    up, down = Lstsq(2, 3), Lstsq(3, 2)
    a, b = torch.randn(10, 2), torch.randn(10, 3)
    with FlopCounterMode(display=False) as counter:  # the per-row part is what torch counts
        up.update(a, b)
        down.update(b, a)
    assert counter.get_total_flops() == pytest.approx(lstsq_flops(10, 2, 3) - lstsq_flops(0, 2, 3))
    a, b, _, _ = affine_pair(n=300)
    assert lstsq_stitch([(a[:200], b[:200]), (a[200:], b[200:])], 12, 12).meta["lstsq_rows"] == 300


def test_lstsq_needs_rows():
    with pytest.raises(ValueError, match="two rows"):
        Lstsq(3, 3).solve()


@torch.no_grad()
def test_identity_stitch_of_a_model_with_itself_changes_nothing(one_thread):
    model = load_lm(ModelConfig(name="tiny", from_config=TINY_NEOX))
    tokens = torch.randint(3, 128, (4, 16))
    tokens[:, 0] = 0
    out = evaluate_stitch(model, model, identity_stitch(64), "resid_pre", 1, 1, tokens, [0])
    for name in ("ce/b", "ce/a_to_b", "ce/b_to_a", "ce/a_round_trip", "ce/b_round_trip"):
        assert out[name] == pytest.approx(out["ce/a"], abs=1e-5), name
    assert out["map/up_ev"] == pytest.approx(1.0) and out["map/up_mse"] == 0.0
    # a map that zeroes the stream is worse: the CE of the stitched model must rise
    zero = Stitch(64, 64).set_maps(*(torch.zeros_like(p) for p in identity_stitch(64).parameters()))
    worse = evaluate_stitch(model, model, zero, "resid_pre", 1, 1, tokens, [0])
    assert worse["ce/a_to_b"] > out["ce/a"] + 1e-3


def test_stitch_config_errors():
    large = ModelConfig(name="b")
    with pytest.raises(ConfigError, match="stitch.pairs"):
        StitchConfig(large=large, num_tokens=4096)
    with pytest.raises(ConfigError, match=r"stitch.pairs: got \(1, 2, 3\)"):
        StitchConfig(large=large, num_tokens=4096, pairs=((1, 2, 3),))
    with pytest.raises(ConfigError, match="stitch.num_tokens"):
        StitchConfig(large=large, num_tokens=10, pairs=((1, 2),))
    with pytest.raises(ConfigError, match="stitch.widths"):
        StitchConfig(large=large, num_tokens=4096, pairs=((1, 2),), widths=(64, 64))
    with pytest.raises(ConfigError, match="stitch.ev_thresholds"):
        StitchConfig(large=large, num_tokens=4096, pairs=((1, 2),), ev_thresholds=(1.5,))
