"""The stitch sweep's analyses that need no Ray (`raysae.stitching.pairs`): what each SAE's
feature evaluation is compared with, whose FLOPs a stitched-init SAE is charged, and A's SAE
carried to B with metadata naming where it came from."""

from __future__ import annotations

import torch
from test_stitch_grid import job

from raysae.config import SAEConfig
from raysae.models import hook_name
from raysae.sae import SAE
from raysae.stitching import grid as stitch_grid
from raysae.stitching import pairs
from raysae.stitching.stitch import Stitch, transfer_sae


def test_feature_targets_compare_each_sae_of_a_with_its_twins_on_b():
    trials = stitch_grid.expand(job(), ("fa", "fb"), {2: 3})
    by_key = {t.key: t for t in trials}
    targets = pairs.feature_targets(trials)
    saes = [t for t in trials if t.role in ("scratch_a", "scratch_b", "zeroshot", "transfer")]
    assert [t.key for t in targets] == [t.key for t in saes]  # stitches and probes are not SAEs
    for target in targets:
        trial = by_key[target.key]
        assert target.large == (trial.role != "scratch_a")
        assert target.layer == (trial.layer_b if target.large else trial.layer_a)
        if trial.role != "scratch_a":
            assert target.compare == ()
            continue
        # per zero-shot twin: it, then the stitched-init SAE of the largest budget grown from it
        zero_shots = [z for z in trials if z.role == "zeroshot" and trial.key in z.depends_on]
        assert [r.key for r in target.compare[::2]] == [z.key for z in zero_shots]
        for zs, grown in zip(target.compare[::2], target.compare[1::2]):
            g = by_key[grown.key]
            assert g.role == "transfer" and g.depends_on == (zs.key,) and g.budget == 2048
            assert grown.large and zs.large and grown.layer == g.layer_b


def test_a_stitched_init_sae_is_charged_its_pairs_stitch():
    trials = stitch_grid.expand(job(), ("fa", "fb"), {2: 3})
    by_key = {t.key: t for t in trials}
    charged = pairs.stitch_of(trials)
    assert set(charged) == {t.key for t in trials if t.role == "transfer"}
    for key, stitch in charged.items():
        assert by_key[stitch].role == "stitch"
        assert (by_key[stitch].layer_a, by_key[stitch].layer_b) == (
            by_key[key].layer_a, by_key[key].layer_b)


def test_carried_sae_is_the_closed_form_transfer_labelled_for_b():
    cfg = job()
    trial = next(t for t in stitch_grid.expand(cfg, ("fa", "fb"), {2: 3}) if t.role == "zeroshot")
    sae_a = SAE(SAEConfig(architecture="topk", d_sae=16, k=4), 8)
    stitch = Stitch(8, 12, seed=3)
    carried = pairs.carried_sae(cfg, sae_a, stitch, trial)
    expected = transfer_sae(sae_a, stitch)
    x = torch.randn(5, 12)
    assert torch.allclose(carried.encode(x), expected.encode(x))
    stitch_key, sae_key = trial.depends_on
    assert carried.metadata.model_name == "B"
    assert carried.metadata.hook_name == hook_name(cfg.stitch.site, trial.layer_b)
    assert carried.metadata.extras["stitched_from"] == sae_key
    assert carried.metadata.extras["stitch"] == stitch_key
