"""The stitch grid: one declaration -> trials, phases, stable keys, per-model jobs; and the
aligned reading of two caches of the same tokens."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest
import torch

from raysae import shards
from raysae.config import (
    ConfigError,
    DataConfig,
    JobConfig,
    ModelConfig,
    ProbeConfig,
    SAEConfig,
    StitchConfig,
    TrainConfig,
)
from raysae.stitching import grid as stitch_grid


def job(**stitch) -> JobConfig:
    base = dict(large=ModelConfig(name="B"), num_tokens=2048, pairs=((1, 2),), match_layers=(2,),
                widths=(64, 128), budgets=(1024, 2048), probes=ProbeConfig(source="p"))
    return JobConfig(
        name="j", model=ModelConfig(name="A"),
        data=DataConfig(source="s", context_length=16, num_tokens=4096),
        sae=SAEConfig(architecture="topk", k=8),
        train=TrainConfig(num_tokens=4096, batch_size=256),
        stitch=StitchConfig(**{**base, **stitch}),
    )


def test_trials_per_phase_and_dependencies():
    trials = stitch_grid.expand(job(), ("fa", "fb"), {2: 3})
    count = lambda p: sum(t.role == p for t in trials)  # noqa: E731
    # 2 pairs, 2 widths, 2 budgets
    assert [count(p) for p in ("stitch", "scratch_a", "scratch_b", "zeroshot", "transfer", "probes")] \
        == [2, 4, 8, 4, 8, 2]
    by_key = {t.key: t for t in trials}
    for t in trials:
        if t.role == "zeroshot":
            assert [by_key[d].role for d in t.depends_on] == ["stitch", "scratch_a"]
            assert by_key[t.depends_on[1]].width == t.width
            assert by_key[t.depends_on[0]].layer_b == t.layer_b
        if t.role == "transfer":
            (z,) = t.depends_on
            assert by_key[z].role == "zeroshot" and by_key[z].width == t.width
    phases = stitch_grid.phases(trials)
    assert {p: sorted({t.role for t in ts}) for p, ts in phases.items()} == {
        "fit": ["scratch_a", "scratch_b", "stitch"], "zeroshot": ["zeroshot"],
        "transfer": ["transfer"], "probes": ["probes"]}
    assert all(t.tags["raysae.phase"] == p and t.tags["raysae.role"] == t.role
               for p, ts in phases.items() for t in ts)


def test_keys_are_stable_and_change_only_where_the_setting_matters():
    keys = lambda j: {t.name: t.key for t in stitch_grid.expand(j, ("fa", "fb"), {2: 3})}  # noqa: E731
    base = keys(job())
    assert base == keys(job())
    assert len(set(base.values())) == len(base)
    probes = keys(job(probes=ProbeConfig(source="p", num_rows=32)))
    changed = {n for n in base if base[n] != probes[n]}
    assert changed == {"A1→B2 probes", "A2→B3 probes"}
    role = {t.name: t.role for t in stitch_grid.expand(job(), ("fa", "fb"), {2: 3})}
    lr = keys(job(lr=1e-3))  # the stitch's lr: the stitches and everything downstream of them
    changed = {role[n] for n in base if base[n] != lr[n]}
    kept = {role[n] for n in base if base[n] == lr[n]}
    assert changed == {"stitch", "zeroshot", "transfer", "probes"}
    assert kept == {"scratch_a", "scratch_b"}


def test_pairs_from_matching_and_explicit_list_deduplicated():
    s = job(pairs=((2, 3), (1, 1))).stitch
    assert stitch_grid.pairs_of(s, {2: 3}) == ((2, 3), (1, 1))
    with pytest.raises(ValueError, match="match"):
        stitch_grid.pairs_of(s, None)


def test_sae_jobs_share_settings_and_differ_in_model_width_budget():
    j = job()
    trials = stitch_grid.expand(j, ("fa", "fb"), {2: 3})
    t = next(t for t in trials if t.role == "transfer" and t.budget == 1024 and t.width == 64)
    b = stitch_grid.sae_job(j, t, large=True)
    assert b.model.name == "B" and b.sae.d_sae == 64 and b.train.num_tokens == 1024
    assert dataclasses.replace(b.train, num_tokens=j.train.num_tokens) == j.train
    a_job, b_job = stitch_grid.cache_jobs(j, ((1, 2), (2, 3)))
    assert a_job.cache.layers == (1, 2) and b_job.cache.layers == (2, 3)
    assert a_job.data == b_job.data and a_job.cache.shard_tokens == b_job.cache.shard_tokens


def test_validation_names_the_field():
    with pytest.raises(ConfigError, match="stitch.widths"):
        stitch_grid.expand(job(widths=(4,)), ("fa", "fb"), {2: 3})
    with pytest.raises(ConfigError, match="stitch.budgets"):
        stitch_grid.expand(job(budgets=(100,)), ("fa", "fb"), {2: 3})


def write_cache(root, d, tokens, seqs, scale):
    root.mkdir(parents=True)
    infos = []
    for i in range(2):
        sl = slice(4 * i, 4 * i + 4)
        acts = torch.arange(4 * d, dtype=torch.float32).reshape(4, d) + 100 * i
        buf = shards.shard_bytes(scale * acts, tokens[sl], torch.arange(4).numpy(), seqs[sl], "float32")
        infos.append(shards.write_shard(root, f"shard-{i}.arrow", buf, 4))
    manifest = shards.Manifest(model="m", revision=None, site="resid_pre", layer=0,
                               hook_name="blocks.0.hook_resid_pre", d_model=d, dtype="float32",
                               context_length=4, dataset="x", fingerprint="f",
                               num_tokens=8, shards=tuple(infos), exclude_special=True)
    shards.write_manifest(root, manifest)
    return shards.ActivationReader(root)


def test_paired_stream_keeps_rows_aligned_and_rejects_other_tokens(tmp_path):
    tokens = pa.array(range(8), pa.int32()).to_numpy()
    seqs = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]).numpy()
    a = write_cache(tmp_path / "a", 3, tokens, seqs, 1.0)
    b = write_cache(tmp_path / "b", 3, tokens, seqs, -2.0)
    stream = list(shards.paired_stream(a, b, 3, seed=1, passes=3))
    assert len(stream) == 8  # 24 rows in 3 passes; nothing is read a 4th time
    for xa, xb in stream:
        assert torch.equal(xb, -2.0 * xa)  # the same rows in the same order on both sides
    assert len(list(shards.paired_stream(a, b, 3))) == 2  # one pass: 8 rows, 2 left over
    other = write_cache(tmp_path / "c", 3, tokens[::-1].copy(), seqs, 1.0)
    with pytest.raises(shards.ShardError, match="token_id"):
        next(shards.paired_stream(a, other, 3))
