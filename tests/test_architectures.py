"""BatchTopK, Matryoshka BatchTopK and the AuxK loss: closed forms, gradients, the threshold,
saved folders and transfer through a stitch (SAELens itself reads them in test_saelens_compat)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import perturb
from safetensors.torch import load_file
from test_train import D_IN, build_train_cfg, sparse_batches

from raysae.architectures import ARCHITECTURES, ArchitectureSpec, allowed, from_saelens, spec_of
from raysae.config import ConfigError, SAEConfig
from raysae.sae import SAE, SAELoadError
from raysae.sae_kernels import (
    Kernels,
    TrainOutput,
    pre_acts,
    register_architecture,
    unregister_architecture,
)
from raysae.sae_ops import _batch_topk_indices
from raysae.stitching.stitch import Stitch, transfer_sae
from raysae.train import train_sae

pytestmark = pytest.mark.usefixtures("one_thread")

MATRYOSHKA = dict(architecture="matryoshka_batchtopk", matryoshka_widths=(8, 20, 32))
K_ARCHS = {"topk": {}, "batchtopk": {"architecture": "batchtopk"},
           "matryoshka_batchtopk": MATRYOSHKA}


def build_sae(arch: str = "batchtopk", d_in: int = 8, d_sae: int = 32,
              dtype: torch.dtype = torch.float32, **overrides: object) -> SAE:
    fields: dict[str, object] = dict(architecture="topk", d_sae=d_sae, k=4)
    fields |= K_ARCHS.get(arch, {"architecture": arch}) | overrides
    return SAE(SAEConfig(**fields), d_in, dtype=dtype)  # type: ignore[arg-type]


def reference(sae: SAE, x_BD: torch.Tensor, dead_F: torch.Tensor | None = None):
    """The training loss written the obvious way (dense latents, plain autograd): TopK per
    token or over the batch, the sum of the prefixes' losses, the AuxK term. Returns the loss,
    the AuxK term and the dense latents."""
    pre = (x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc
    k, B = sae.cfg.k, x_BD.shape[0]
    if sae.cfg.architecture == "topk":
        vals, idx = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    else:
        vals, idx = pre.flatten().topk(k * B)
        f = torch.zeros_like(pre).flatten().scatter(0, idx, vals.relu()).view_as(pre)
    recons = [f[:, :w] @ sae.W_dec[:w] + sae.b_dec for w in sae.widths]
    loss = sum((r - x_BD).pow(2).sum(-1).mean() for r in recons)
    auxk = None
    if dead_F is not None:
        k_aux = x_BD.shape[1] // 2
        A = min(k_aux, int(dead_F.sum()))
        vals, idx = torch.where(dead_F, pre, -torch.inf).topk(A, dim=-1)
        f_aux = torch.zeros_like(pre).scatter(1, idx, vals.relu())
        auxk = (A / k_aux) * (f_aux @ sae.W_dec - (x_BD - recons[-1]).detach()).pow(2).sum(-1).mean()
        loss = loss + sae.cfg.aux_coefficient * auxk
    return loss, auxk, f


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(matryoshka_widths=()), "sae.matryoshka_widths"),
        (dict(matryoshka_widths=(8, 8, 32)), "strictly increasing"),
        (dict(matryoshka_widths=(8, 16)), "equal to sae.d_sae"),
        (dict(aux_coefficient=-1.0), "sae.aux_coefficient"),
        (dict(k=40), "sae.k"),
    ],
)
def test_config_errors_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SAEConfig(**({"architecture": "matryoshka_batchtopk", "d_sae": 32, "k": 4,
                      "matryoshka_widths": (8, 32)} | fields))


def test_matryoshka_widths_must_end_at_the_width_when_it_comes_from_d_in() -> None:
    cfg = SAEConfig(architecture="matryoshka_batchtopk", expansion_factor=4, k=4,
                    matryoshka_widths=(8, 30))
    with pytest.raises(ConfigError, match=r"equal to d_sae \(32\)"):
        SAE(cfg, 8)
    assert SAE(SAEConfig(architecture="matryoshka_batchtopk", expansion_factor=4, k=4,
                         matryoshka_widths=(8, 32)), 8).widths == (8, 32)


# ---------------------------------------------------------------------------------------------
# BatchTopK


def test_batchtopk_keeps_exactly_k_times_batch_nonzeros_in_training() -> None:
    sae = build_sae("batchtopk", d_sae=64, k=5)
    with torch.no_grad():
        sae.b_enc.fill_(20.0)  # every pre-activation positive: the ReLU removes none
    x = torch.randn(96, 8)
    out = sae.train_forward(x, 0.0)
    _, _, f = reference(sae, x)
    assert int((f != 0).sum()) == 5 * 96
    assert int(out.fired_F.sum()) == int((f != 0).any(0).sum())
    counts = (f != 0).sum(-1)
    assert counts.min() < 5 < counts.max()  # k on average, not per token
    torch.testing.assert_close(out.mse, (f @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean())


@pytest.mark.parametrize("hint", [None, 1e9, -1e9, 0.0])
def test_batch_topk_selection_is_exact_whatever_the_hint(hint: float | None) -> None:
    """The CPU path lists the entries above a cutoff first; a cutoff too high (none above),
    too low (all above) or missing gives the same entries as a flat topk."""
    pre = torch.randn(300, 50)
    box: list[float | None] = [hint]
    got = _batch_topk_indices(pre, 700, box)
    expected = pre.flatten().topk(700).indices.sort().values
    assert torch.equal(got, expected)
    again = _batch_topk_indices(pre, 700, box)  # now with the hint this call left
    assert torch.equal(again, expected)


def test_threshold_is_a_running_average_of_the_smallest_kept_activation() -> None:
    sae = build_sae("batchtopk")
    assert float(sae.threshold[0]) == 0.0  # before any batch: a ReLU, as SAELens starts
    sae.update_threshold_(torch.tensor(2.0))
    assert float(sae.topk_threshold) == 2.0  # the first batch sets it
    sae.update_threshold_(torch.tensor(1.0))
    assert float(sae.topk_threshold) == pytest.approx(2.0 - 0.01)
    sae.update_threshold_(torch.tensor(float("inf")))  # a batch that kept nothing
    assert float(sae.topk_threshold) == pytest.approx(1.99)


def test_threshold_gives_l0_close_to_k_on_held_out_tokens() -> None:
    """Trained on sparse codes, the one threshold that replaces the batch-level selection keeps
    about k latents per held-out token (3.80 for k = 4 here; 3.96 after 800 steps)."""
    sae = SAE(SAEConfig(architecture="batchtopk", d_sae=64, k=4), 16, seed=1)
    cfg = build_train_cfg(num_tokens=400 * 256, checkpoint_every_tokens=400 * 256,
                          log_every_steps=1000)
    train_sae(sae, cfg, sparse_batches(256))
    held_out = next(sparse_batches(4096, start=10**6))  # batches never trained on
    with torch.no_grad():
        l0 = float((sae.encode(held_out) != 0).sum(-1).float().mean())
    assert abs(l0 - 4) < 0.4, l0
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


# ---------------------------------------------------------------------------------------------
# Matryoshka


def test_matryoshka_loss_is_the_sum_of_the_prefix_losses() -> None:
    """Prefixes of widths 2 and 4, two tokens, k = 2 (four latents over the batch), by hand:
    pre = [[3, 1, 1.5, 0.5], [0.2, 2.2, 0.1, 1.1]] keeps 3, 1.5 (token 1) and 2.2, 1.1
    (token 2); the width-2 prefix decodes [3, 0] and [0, 2.2] (squared errors 1 and 0.04), the
    whole [3, 1.5] and [1.1, 2.2] (0.25 and 0.81)."""
    sae = SAE(SAEConfig(architecture="matryoshka_batchtopk", d_sae=4, k=2,
                        matryoshka_widths=(2, 4)), 2, dtype=torch.float64)
    e1, e2 = torch.eye(2, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.stack([e1, e2, 0.5 * e1, 0.5 * e2], dim=1))
        sae.W_dec.copy_(torch.stack([e1, e2, e2, e1]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.tensor([[3.0, 1.0], [0.2, 2.2]], dtype=torch.float64)
    out = sae.train_forward(x, 0.0)
    prefix = torch.tensor([(1 + 0.04) / 2, (0.25 + 0.81) / 2], dtype=torch.float64)
    torch.testing.assert_close(out.prefix_mse, prefix)
    torch.testing.assert_close(out.mse, prefix[1])
    torch.testing.assert_close(out.loss, prefix.sum())


def test_matryoshka_forward_gives_every_prefix() -> None:
    sae = perturb(build_sae("matryoshka_batchtopk"))
    x = torch.randn(16, 8)
    out = sae(x)
    f = out.feats_BF
    assert len(out.prefix_recons) == 3
    for w, recon in zip((8, 20, 32), out.prefix_recons):
        torch.testing.assert_close(recon, f[:, :w] @ sae.W_dec[:w] + sae.b_dec)
    torch.testing.assert_close(out.recon_BD, sae.decode(f))


# ---------------------------------------------------------------------------------------------
# The fused steps against autograd, and AuxK


@pytest.mark.parametrize("aux", [0.0, 0.5])
@pytest.mark.parametrize("arch", list(K_ARCHS))
def test_fused_step_matches_autograd(arch: str, aux: float) -> None:
    sae = perturb(build_sae(arch, dtype=torch.float64, aux_coefficient=aux))
    x = torch.randn(64, 8, dtype=torch.float64)
    dead = (torch.arange(32) % 3 == 0) if aux else None
    params = list(sae.parameters())
    ref, ref_aux, _ = reference(sae, x, dead)
    out = sae.train_forward(x, 0.3, dead)
    torch.testing.assert_close(out.loss, ref)
    if aux:
        torch.testing.assert_close(out.auxk_loss, ref_aux)
    for g, g_ref in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("arch", list(K_ARCHS))
def test_auxk_gradient_reaches_dead_latents_only(arch: str) -> None:
    sae = perturb(build_sae(arch, aux_coefficient=1 / 32))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 5, 9, 20, 30]] = True
    out = sae.train_forward(torch.randn(64, 8), 0.0, dead)
    assert out.auxk_loss is not None and out.auxk_loss > 0
    g_enc, g_b_enc, g_dec = torch.autograd.grad(out.auxk_loss, [sae.W_enc, sae.b_enc, sae.W_dec])
    assert not g_enc[:, ~dead].any() and not g_b_enc[~dead].any() and not g_dec[~dead].any()
    assert g_enc[:, dead].any(0).sum() >= 3  # and it does reach the dead ones


def test_auxk_is_logged_and_off_without_dead_latents() -> None:
    sae = build_sae("batchtopk", d_in=16, d_sae=64, aux_coefficient=1 / 32)
    assert sae.train_forward(torch.randn(8, 16), 0.0).auxk_loss is None  # no dead mask
    none_dead = sae.train_forward(torch.randn(8, 16), 0.0, torch.zeros(64, dtype=torch.bool))
    assert float(none_dead.auxk_loss) == 0.0
    reports: list[dict[str, float]] = []
    cfg = build_train_cfg(num_tokens=2048, dead_window_tokens=256, log_every_steps=4)
    train_sae(sae, cfg, sparse_batches(256), on_metrics=lambda t, m: reports.append(m))
    assert all("auxk_loss" in m and "threshold" in m for m in reports)
    assert reports[-1]["dead_fraction"] < 1.0


def test_matryoshka_training_reports_every_prefix() -> None:
    sae = SAE(SAEConfig(architecture="matryoshka_batchtopk", d_sae=64, k=4,
                        matryoshka_widths=(16, 32, 64)), 16, seed=1)
    sae.init_b_dec(next(sparse_batches(1024, start=10**6)), "mean")
    reports: list[dict[str, float]] = []
    cfg = build_train_cfg(num_tokens=128 * 256, log_every_steps=32)
    train_sae(sae, cfg, sparse_batches(256), on_metrics=lambda t, m: reports.append(m))
    last = reports[-1]
    assert last["mse_prefix_64"] == pytest.approx(last["mse"])
    assert last["explained_variance_prefix_64"] == pytest.approx(last["explained_variance"])
    assert last["mse_prefix_16"] > last["mse_prefix_32"] > last["mse_prefix_64"]  # nested
    assert last["explained_variance_prefix_16"] > 0.5
    assert last["loss"] == pytest.approx(sum(last[f"mse_prefix_{w}"] for w in (16, 32, 64)))
    assert reports[-1]["loss"] < reports[0]["loss"]


def test_resume_restores_the_threshold_and_gives_identical_weights(tmp_path: Path) -> None:
    from test_train import build_sae as build_train_sae

    from raysae.checkpoint import load_train_state, save_train_state

    cfg = build_train_cfg(num_tokens=3000, checkpoint_every_tokens=1000, dead_window_tokens=512)
    overrides = dict(architecture="batchtopk", aux_coefficient=1 / 32)
    full = build_train_sae("topk", **overrides)
    states = []
    train_sae(full, cfg, sparse_batches(256), on_checkpoint=states.append)
    save_train_state(states[0], tmp_path / "state")
    resumed = build_train_sae("topk", **overrides)
    train_sae(resumed, cfg, sparse_batches(256, start=states[0].tokens_seen // 256),
              start_state=load_train_state(tmp_path / "state"))
    assert float(full.topk_threshold) > 0
    for name, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


# ---------------------------------------------------------------------------------------------
# Folders and transfer


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_saved_as_jumprelu_with_one_threshold_and_loaded_back(arch: str, tmp_path: Path) -> None:
    sae = perturb(build_sae(arch))
    sae.update_threshold_(torch.tensor(0.7))
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    assert cfg["metadata"]["training_architecture"] == arch
    assert cfg["metadata"]["training_architecture_details"]["k"] == 4
    tensors = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    assert torch.equal(tensors["threshold"], torch.full((32,), 0.7))
    back = SAE.load(tmp_path / "s")
    assert back.cfg == sae.cfg and float(back.topk_threshold) == pytest.approx(0.7)
    x = torch.randn(64, 8)
    with torch.no_grad():
        assert torch.equal(back(x).recon_BD, sae(x).recon_BD)
    dst = SAE.init_from(tmp_path / "s", sae.cfg, 8)  # a layer transfer starts from θ too
    assert float(dst.topk_threshold) == pytest.approx(0.7)
    with pytest.raises(SAELoadError, match="holds a 'jumprelu' SAE"):
        SAE.init_from(tmp_path / "s", build_sae("topk").cfg, 8)


def test_a_folder_with_differing_thresholds_is_not_batchtopk(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sae = build_sae("batchtopk")
    sae.save(tmp_path / "s")
    tensors = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    tensors["threshold"] = torch.rand(32)
    save_file(tensors, str(tmp_path / "s" / "sae_weights.safetensors"))
    with pytest.raises(SAELoadError, match="one threshold for every latent"):
        SAE.load(tmp_path / "s")


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_transfer_through_a_stitch_keeps_threshold_and_batch_selection(arch: str) -> None:
    """The transferred encoder gives A's pre-activations of T↓(b): the same threshold gates the
    same latents at inference, and a batch keeps the same k·B entries in training."""
    sae = perturb(build_sae(arch, d_in=12))
    sae.update_threshold_(torch.tensor(0.4))
    st = Stitch(12, 20, seed=5)
    moved = transfer_sae(sae, st)
    assert moved.cfg == sae.cfg and torch.equal(moved.threshold, sae.threshold)
    x_b = torch.randn(64, 20)
    with torch.no_grad():
        torch.testing.assert_close(moved.encode(x_b), sae.encode(st.down(x_b)), atol=1e-4, rtol=0)
        assert (moved.encode(x_b) != 0).sum() > 0
    ours, theirs = moved.train_forward(x_b, 0.0), sae.train_forward(st.down(x_b).detach(), 0.0)
    assert torch.equal(ours.fired_F, theirs.fired_F)
    torch.testing.assert_close(ours.min_active, theirs.min_active, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# The sweep's architecture axis


def test_architecture_axis_gives_each_architecture_its_own_grid() -> None:
    from test_grid import build_job, build_sweep

    from raysae.transfer.grid import architecture_jobs, base_digest, expand, sae_costs

    job = build_job(sae=SAEConfig(architecture="topk", k=8),
                    sweep=build_sweep(architectures=("topk", "batchtopk")))
    jobs = architecture_jobs(job)
    assert [j.sae.architecture for j in jobs] == ["topk", "batchtopk"]
    assert all(j.sweep.architectures == () and j.sae.k == 8 for j in jobs)
    grids = [expand(j, j.sweep, base_digest(j, "fp")) for j in jobs]
    assert len(grids[0]) == len(grids[1]) > 0
    assert not {t.key for t in grids[0]} & {t.key for t in grids[1]}
    assert [{t.tags["raysae.architecture"] for t in g} for g in grids] == [{"topk"}, {"batchtopk"}]
    # one architecture, declared or not, is the sweep it always was
    single = build_job(sae=SAEConfig(architecture="topk", k=8), sweep=build_sweep())
    assert architecture_jobs(single) == [single]
    assert [t.key for t in expand(single, single.sweep, base_digest(single, "fp"))] == [
        t.key for t in grids[0]]
    # the plan counts every architecture's trainings
    by_phase = sae_costs(job, grids[0])
    assert [p.sae.architecture for p in by_phase["scratch"]] == ["topk", "batchtopk"] * 4


def test_architecture_axis_is_validated() -> None:
    from test_grid import build_job, build_sweep

    from raysae.transfer.grid import validate

    with pytest.raises(ConfigError, match="sweep.architectures: got .*no repeated"):
        build_sweep(architectures=("topk", "topk"))
    job = build_job(sweep=build_sweep(architectures=("topk", "matryoshka_batchtopk")))
    with pytest.raises(ConfigError, match="sweep.architectures: 'matryoshka_batchtopk'.*"
                                          "sae.matryoshka_widths"):
        validate(job, job.sweep)


# ---------------------------------------------------------------------------------------------
# The registry: one entry per architecture, the config's values derived from it


@dataclasses.dataclass(frozen=True)
class _ShiftedSpec(ArchitectureSpec):
    """A toy: f = ReLU(pre - shift), its own config check and its own price."""

    def problems(self, cfg, d_sae, width):
        if cfg.l1_coefficient > 10:
            yield "sae.l1_coefficient", cfg.l1_coefficient, "at most 10 for shifted_relu"

    def step_flops_per_token(self, cfg, d_in, d_sae):
        return 12.0 * d_in * d_sae


class _ShiftedKernels(Kernels):
    """Plain autograd: the training forward is `forward`'s loss."""

    def encode(self, sae, x_BD):
        return (pre_acts(sae, x_BD) - 0.5).relu()

    def scored_encode(self, sae, x_BD):
        feats_BF = sae.encode(x_BD)
        return feats_BF, feats_BF.sum(-1).mean()

    def train_forward(self, sae, x_BD, x_c, w, dead_F, sparsity_coeff):
        out = sae(x_BD, sparsity_coeff)
        return TrainOutput(out.loss, out.mse, out.sparsity, (out.feats_BF > 0).any(0))


@pytest.fixture
def shifted_relu():
    """A sixth architecture registered from the test alone (no other module edited)."""
    register_architecture(_ShiftedSpec("shifted_relu", "standard", native=False),
                          _ShiftedKernels())
    yield "shifted_relu"
    unregister_architecture("shifted_relu")


def test_an_architecture_registered_in_a_test_is_configured_trained_saved_and_priced(
        shifted_relu, tmp_path: Path) -> None:
    from test_grid import build_job, build_sweep

    from raysae import costs
    from raysae.config import from_dict
    from raysae.transfer.grid import architecture_jobs

    # the config accepts it, in the sae section and on the sweep's architecture axis, and
    # runs its own check
    cfg = from_dict(SAEConfig, {"architecture": shifted_relu, "d_sae": 4 * D_IN, "l1_coefficient": 0.1})
    assert shifted_relu in allowed()
    job = build_job(sweep=build_sweep(architectures=("relu", shifted_relu)))
    assert [j.sae.architecture for j in architecture_jobs(job)] == ["relu", shifted_relu]
    with pytest.raises(ConfigError, match="sae.l1_coefficient: got 20.0, expected at most 10"):
        SAEConfig(architecture=shifted_relu, l1_coefficient=20.0)
    # it trains (its kernels, through the loop)
    sae = SAE(cfg, D_IN, seed=1)
    before = sae.W_enc.detach().clone()
    state = train_sae(sae, build_train_cfg(num_tokens=1024, batch_size=256), sparse_batches(256))
    assert state.step == 4 and not torch.equal(before, sae.W_enc)
    x = torch.randn(16, D_IN)
    assert torch.equal(sae.encode(x), ((x - sae.b_dec) @ sae.W_enc + sae.b_enc - 0.5).relu())
    # it saves under its SAELens name and loads back as itself
    sae.save(tmp_path / "s")
    saved = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert saved["architecture"] == "standard"
    back = SAE.load(tmp_path / "s")
    assert back.cfg == sae.cfg
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                  sae.state_dict().values()))
    assert torch.equal(back(x).loss, sae(x).loss)
    # the plan prices it from its spec
    d, F = D_IN, 4 * D_IN
    assert costs.sae_step_flops_per_token(cfg, d) == 12.0 * d * F
    assert costs.sae_memory_bytes(cfg, d, 4) == 16 * (2 * d * F + F + d) + 12 * 4 * F + 8 * F
    with pytest.raises(KeyError, match="known: relu"):
        spec_of("not_registered")


def test_the_registry_is_the_config_s_set_of_architectures() -> None:
    from test_grid import build_sweep

    from raysae.config import from_dict

    assert list(ARCHITECTURES) == ["relu", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk"]
    with pytest.raises(ConfigError, match="expected one of 'relu', 'topk', 'jumprelu', "
                                          "'batchtopk', 'matryoshka_batchtopk'"):
        from_dict(SAEConfig, {"architecture": "transcoder"})
    with pytest.raises(ConfigError, match="sweep.architectures: got 'gated'"):
        build_sweep(architectures=("relu", "gated"))
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(ARCHITECTURES["relu"], Kernels())
    # SAELens's names, both ways (BatchTopK saved as JumpReLU names its training architecture)
    assert {n: s.saelens_name for n, s in ARCHITECTURES.items()} == {
        "relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
        "matryoshka_batchtopk": "jumprelu"}
    assert from_saelens("jumprelu", "batchtopk").name == "batchtopk"
    assert from_saelens("jumprelu", None).name == "jumprelu"
    assert from_saelens("topk", "batchtopk").name == "topk"
    assert from_saelens("gated", None) is None


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk"])
def test_the_cost_model_prices_each_architecture_by_its_spec(arch: str) -> None:
    from raysae import costs

    d, F, k = 16, 64, 4
    cfg = build_sae(arch, d_in=d, d_sae=F, k=k, matryoshka_widths=(8, 20, 64)).cfg
    dense = not cfg.uses_k
    assert costs.sae_step_flops_per_token(cfg, d) == (10 * d * F if dense else 2 * d * F + 10 * d * k)
    extra = F if arch == "jumprelu" else 0
    assert costs.sae_memory_bytes(cfg, d, 8) == 16 * (2 * d * F + F + d + extra) + 12 * 8 * F + 8 * F
    aux = dataclasses.replace(cfg, aux_coefficient=0.1)
    assert costs.sae_step_flops_per_token(aux, d) - costs.sae_step_flops_per_token(cfg, d) == (
        0 if dense else 4 * d * (d // 2))
