"""The training loop: schedules, token budget, checkpoints, resume, dead latents."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import torch

from raysae.checkpoint import TrainState, load_train_state, save_train_state
from raysae.config import ModelConfig, SAEConfig, StitchConfig, TrainConfig
from raysae.sae import SAE
from raysae.stitching.stitch import Stitch, train_stitch
from raysae.train import (
    Diverged,
    dense_sae_flops_per_token,
    l1_coeff_at,
    lr_at,
    sae_flops_per_token,
    total_steps,
    train_sae,
)

D_IN, N_TRUE = 16, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def build_train_cfg(**overrides: object) -> TrainConfig:
    fields: dict[str, object] = dict(
        num_tokens=4000,
        batch_size=256,
        lr=3e-3,
        adam_betas=(0.9, 0.999),
        lr_warmup_frac=0.05,
        lr_decay_frac=0.2,
        l1_warmup_frac=0.05,
        checkpoint_every_tokens=1000,
        dead_window_tokens=1000,
        log_every_steps=5,
    )
    return TrainConfig(**(fields | overrides))  # type: ignore[arg-type]


def sparse_batches(batch_size: int, start: int = 0, seed: int = 0) -> Iterator[torch.Tensor]:
    """x = sparse codes @ a fixed random dictionary; batch i depends only on (seed, i)."""
    dictionary = torch.nn.functional.normalize(
        torch.randn(N_TRUE, D_IN, generator=torch.Generator().manual_seed(seed)), dim=1
    )
    for i in count(start):
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        active = torch.rand(batch_size, N_TRUE, generator=gen) < 3 / N_TRUE
        codes = active * (1 + torch.rand(batch_size, N_TRUE, generator=gen))
        yield codes @ dictionary + 0.5


def build_sae(arch: str, **overrides: object) -> SAE:
    fields: dict[str, object] = dict(architecture=arch, d_sae=64, k=4, l1_coefficient=0.05)
    fields |= dict(jumprelu_threshold=0.05, jumprelu_bandwidth=0.05) | overrides
    return SAE(SAEConfig(**fields), D_IN, seed=1)  # type: ignore[arg-type]


def checkpoint_to(folder: Path, sae: SAE) -> Callable[[TrainState], None]:
    """An `on_checkpoint` that writes `folder/tokens_{n}/` with `state/` and a SAELens `sae/`."""

    def save(state: TrainState) -> None:
        out = folder / f"tokens_{state.tokens_seen}"
        save_train_state(state, out / "state")
        sae.save(out / "sae")

    return save


def test_schedule_boundaries() -> None:
    cfg = build_train_cfg(num_tokens=100 * 256)  # 100 steps: 5 of warm-up, 20 of decay
    total = total_steps(cfg)
    assert total == 100
    lr = cfg.lr
    assert lr_at(0, total, cfg) == pytest.approx(lr / 5)
    assert lr_at(4, total, cfg) == pytest.approx(lr)  # last warm-up step reaches the peak
    assert lr_at(5, total, cfg) == pytest.approx(lr)
    assert lr_at(79, total, cfg) == pytest.approx(lr)
    assert lr_at(80, total, cfg) == pytest.approx(lr)  # decay starts at the peak
    assert lr_at(90, total, cfg) == pytest.approx(lr / 2)
    assert lr_at(99, total, cfg) == pytest.approx(lr / 20)  # last step, one notch above zero
    assert l1_coeff_at(0, total, cfg, 5.0) == pytest.approx(1.0)
    assert l1_coeff_at(4, total, cfg, 5.0) == pytest.approx(5.0)
    assert l1_coeff_at(99, total, cfg, 5.0) == pytest.approx(5.0)


def test_schedule_without_warmup_or_decay() -> None:
    cfg = build_train_cfg(lr_warmup_frac=0.0, lr_decay_frac=0.0, l1_warmup_frac=0.0)
    total = total_steps(cfg)
    assert total == 16  # ceil(4000 / 256)
    assert {lr_at(s, total, cfg) for s in range(total)} == {cfg.lr}
    assert l1_coeff_at(0, total, cfg, 5.0) == 5.0


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_training_lowers_loss_and_stops_at_the_budget(arch: str) -> None:
    cfg = build_train_cfg(num_tokens=40_000, lr=1e-2)  # 156.25 batches: the last is trimmed
    sae = build_sae(arch, k=6)
    sae.init_b_dec(next(sparse_batches(1024, seed=9)), "geometric_median")
    reports: list[tuple[int, dict[str, float]]] = []
    state = train_sae(sae, cfg, sparse_batches(256), on_metrics=lambda t, m: reports.append((t, m)))
    assert state.tokens_seen == 40_000 and state.step == 157
    assert reports[-1][0] == 40_000
    first, last = reports[0][1], reports[-1][1]
    assert last["mse"] < 0.2 * first["mse"]
    assert last["explained_variance"] > 0.8
    for key in (
        "loss",
        "sparsity",
        "l0",
        "dead_fraction",
        "dense_fraction",
        "lr",
        "tokens_per_second",
    ):
        assert key in last
    if arch == "topk":
        assert last["l0"] <= 6
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_last_batch_is_trimmed_to_the_budget() -> None:
    cfg = build_train_cfg(num_tokens=1000, batch_size=256)
    taken: list[int] = []

    def data() -> Iterator[torch.Tensor]:
        for batch in sparse_batches(256):
            taken.append(batch.shape[0])
            yield batch

    seen: list[int] = []
    state = train_sae(build_sae("relu"), cfg, data(), on_metrics=lambda t, m: seen.append(t))
    assert state.tokens_seen == 1000 and len(taken) == 4  # 256 * 3 + 232
    assert seen[-1] == 1000


def test_running_out_of_data_is_an_error() -> None:
    cfg = build_train_cfg(num_tokens=1000)
    batches = [torch.randn(256, D_IN) for _ in range(2)]
    with pytest.raises(ValueError, match=r"ran out after 512 of the 1,000 tokens of the budget \(488 short\)"):
        train_sae(build_sae("relu"), cfg, batches)


def test_checkpoints_at_token_multiples_and_at_the_end() -> None:
    cfg = build_train_cfg(num_tokens=3000, checkpoint_every_tokens=1000)
    states: list[TrainState] = []
    train_sae(build_sae("relu"), cfg, sparse_batches(256), on_checkpoint=states.append)
    assert [s.tokens_seen for s in states] == [1024, 2048, 3000]
    assert [s.step for s in states] == [4, 8, 12]


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_resume_gives_identical_weights(arch: str, tmp_path: Path) -> None:
    cfg = build_train_cfg(num_tokens=5000, checkpoint_every_tokens=2000)
    full = build_sae(arch)
    states: list[TrainState] = []
    final = train_sae(full, cfg, sparse_batches(256), on_checkpoint=states.append)

    mid = states[0]
    assert mid.tokens_seen == 2048
    save_train_state(mid, tmp_path / "state")
    restored = load_train_state(tmp_path / "state")
    resumed = build_sae(arch)
    batches = sparse_batches(256, start=mid.tokens_seen // 256)
    final2 = train_sae(resumed, cfg, batches, start_state=restored)

    assert (final2.step, final2.tokens_seen) == (final.step, final.tokens_seen)
    for name, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    for key, value in final.optimizer.items():
        assert torch.equal(final2.optimizer[key], value), key
    since = "tokens_since_fired_F"
    assert torch.equal(final2.extra[since], final.extra[since])


def test_train_state_files_hold_no_pickles(tmp_path: Path) -> None:
    state = train_sae(build_sae("topk"), build_train_cfg(num_tokens=512), sparse_batches(256))
    save_train_state(state, tmp_path / "st")
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == [
        "state.json",
        "state.safetensors",
    ]
    back = load_train_state(tmp_path / "st")
    assert back.step == state.step and back.model.keys() == state.model.keys()
    assert torch.equal(back.extra["rng_cpu"], state.extra["rng_cpu"])


def test_checkpoint_to_writes_state_and_a_loadable_sae(tmp_path: Path) -> None:
    sae = build_sae("relu")
    cfg = build_train_cfg(num_tokens=1024, checkpoint_every_tokens=512)
    train_sae(sae, cfg, sparse_batches(256), on_checkpoint=checkpoint_to(tmp_path, sae))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens_1024", "tokens_512"]
    loaded = SAE.load(tmp_path / "tokens_1024" / "sae")
    assert torch.equal(loaded.W_enc, sae.W_enc)
    assert load_train_state(tmp_path / "tokens_1024" / "state").tokens_seen == 1024


def train_either(kind: str, batches: Iterable[torch.Tensor], **kw: Any) -> TrainState:
    """Train an SAE, or a stitch on (x, 2x + 1) pairs, on the same budget: 1000 tokens in
    global steps of 256, checkpoints every 500 tokens, metrics every 2 steps."""
    if kind == "sae":
        cfg = build_train_cfg(num_tokens=1000, checkpoint_every_tokens=500, log_every_steps=2)
        return train_sae(build_sae("relu"), cfg, batches, **kw)
    large = ModelConfig(name="b")
    s = StitchConfig(large=large, pairs=((0, 0),), num_tokens=1000, batch_size=256,
                     checkpoint_every_tokens=500)
    pairs = ((x, 2 * x + 1) for x in batches)
    return train_stitch(Stitch(D_IN, D_IN), s, pairs, log_every_steps=2, **kw)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("kind", ["sae", "stitch"])
def test_sae_and_stitch_share_one_loop(kind: str, world_size: int) -> None:
    """The exact budget (the last batch trimmed on each worker), the log and checkpoint points
    and the out-of-data error come from one skeleton: the same for a stitch as for an SAE."""
    seen: list[int] = []
    saved: list[int] = []
    reduced: list[int] = []
    state = train_either(
        kind,
        sparse_batches(256 // world_size),
        world_size=world_size,
        on_metrics=lambda t, m: seen.append(t),
        on_checkpoint=lambda st: saved.append(st.tokens_seen),
        allreduce_grads=lambda params: reduced.append(len(params)),
    )
    assert (state.step, state.tokens_seen) == (4, 1000)  # 256 * 3 + 232
    assert seen == [512, 1000] and saved == [512, 1000] and len(reduced) == 4
    section = "train" if kind == "sae" else "stitch"
    two_steps = [torch.randn(256 // world_size, D_IN) for _ in range(2)]
    with pytest.raises(ValueError, match=rf"\(488 short\).* lower {section}.num_tokens"):
        train_either(kind, two_steps, world_size=world_size)


def test_dead_latents_are_counted() -> None:
    sae = build_sae("relu")
    with torch.no_grad():
        sae.b_enc[:16] = -1e6  # these 16 of 64 latents can never fire
    cfg = build_train_cfg(num_tokens=3000, dead_window_tokens=1000, lr=1e-6, log_every_steps=2)
    reports: list[dict[str, float]] = []
    state = train_sae(sae, cfg, sparse_batches(256), on_metrics=lambda t, m: reports.append(m))
    assert (state.extra["tokens_since_fired_F"][:16] == 3000).all()
    assert reports[-1]["dead_fraction"] == pytest.approx(16 / 64)
    assert reports[0]["dead_fraction"] == 0.0  # nobody is dead before a full window


def test_allreduce_hook_sees_every_step_and_world_size_scales_tokens() -> None:
    calls: list[int] = []

    def allreduce(params: list[torch.Tensor]) -> None:
        calls.append(len(params))

    cfg = build_train_cfg(num_tokens=2048, batch_size=512)
    # Two workers, each feeding half of every global batch.
    state = train_sae(
        build_sae("relu"), cfg, sparse_batches(256), allreduce_grads=allreduce, world_size=2
    )
    assert state.tokens_seen == 2048 and state.step == 4
    assert calls == [4, 4, 4, 4]


def test_flops_are_counted_per_token() -> None:
    D, F, k, B = 32, 256, 8, 64
    cfg = TrainConfig(num_tokens=4096, batch_size=B)
    x = torch.randn(B, D)
    dense = sae_flops_per_token(SAE(SAEConfig(architecture="relu", d_sae=F), D), x, cfg)
    # five [B, D] x [D, F]-sized products per step (encoder, decoder, their three gradients)
    assert 5 * 2 * D * F <= dense <= 5.5 * 2 * D * F
    sparse = sae_flops_per_token(SAE(SAEConfig(architecture="topk", d_sae=F, k=k), D), x, cfg)
    # the dense encoder plus O(k D) for the sparse decode and backward: far below relu
    assert 2 * D * F + 2 * k * D <= sparse <= 2 * D * F + 10 * 2 * k * D


def test_dense_equivalent_flops_are_five_dense_products() -> None:
    """The stitching paper's accounting: a TopK step with dense [B, d_sae] latents."""
    from torch.utils.flop_counter import FlopCounterMode

    D, F, k, B = 4, 8, 2, 16
    # encoder x W_enc, decoder f W_dec; grads of W_dec (fᵀg), of f (g W_decᵀ), of W_enc (xᵀg_pre):
    # five [D, F]-sized multiply-adds per token, 2·4·8 = 64 FLOPs each
    assert dense_sae_flops_per_token(D, F) == 5 * 64 == 320
    W_enc, W_dec = torch.randn(D, F, requires_grad=True), torch.randn(F, D, requires_grad=True)
    x = torch.randn(B, D)
    with FlopCounterMode(display=False) as counter:  # a plain dense TopK step, as torch runs it
        pre = x @ W_enc
        vals, idx = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(1, idx, vals.relu())
        ((f @ W_dec - x) ** 2).sum().backward()
    assert counter.get_total_flops() / B == dense_sae_flops_per_token(D, F)
    # relu runs dense in raysae too: its counted step is the dense count (to O(1/D))
    D, F = 64, 256
    x = torch.randn(B, D)
    cfg = TrainConfig(num_tokens=4096, batch_size=B)
    relu = sae_flops_per_token(SAE(SAEConfig(architecture="relu", d_sae=F), D), x, cfg)
    assert relu == pytest.approx(dense_sae_flops_per_token(D, F), rel=0.05)
    topk = sae_flops_per_token(SAE(SAEConfig(architecture="topk", d_sae=F, k=8), D), x, cfg)
    assert topk < dense_sae_flops_per_token(D, F) / 3  # what the sparse kernels save


@pytest.mark.parametrize("kind", ["sae", "stitch"])
def test_a_non_finite_step_stops_training_with_its_step_and_tokens(kind: str) -> None:
    """A NaN in the 3rd batch makes that step's gradient non-finite: the loop stops at the next
    point where the host reads values (here the log step after it) naming step 3 and its 768
    tokens; the checkpoint before it is the last one written, and no metrics of a NaN window
    are reported."""
    def batches() -> Iterator[torch.Tensor]:
        for i, x in enumerate(sparse_batches(256)):
            yield torch.full_like(x, float("nan")) if i == 2 else x

    seen: list[int] = []
    saved: list[TrainState] = []
    with pytest.raises(Diverged, match=r"at step 3 \(768 tokens seen\).* Lower (train|stitch)\.lr") as e:
        train_either(kind, batches(), on_metrics=lambda t, m: seen.append(t),
                     on_checkpoint=saved.append)
    assert (e.value.step, e.value.tokens) == (3, 768)
    assert seen == [512] and [s.tokens_seen for s in saved] == [512]
    assert all(torch.isfinite(v).all() for v in saved[0].model.values())


def test_a_learning_rate_that_diverges_is_caught() -> None:
    cfg = build_train_cfg(lr=1e30, lr_warmup_frac=0.0, grad_clip=0.0)
    with pytest.raises(Diverged, match="training diverged: non-finite loss or gradient"):
        train_sae(build_sae("relu"), cfg, sparse_batches(256))
