"""The plan: closed-form costs of the paper config, the source `auto` picks, a cache refused
beyond the free disk, groups packed by memory, and the shipped model configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import build_cfg

from raysae import costs
from raysae.cli import job_costs, main
from raysae.config import ConfigError, DataConfig, ModelConfig, SAEConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "jobs" / "configs" / "pythia160m_layers.yaml"


@pytest.mark.parametrize(("name", "params"), [
    ("EleutherAI/pythia-160m-deduped", 162_322_944),  # the Pythia paper's counts
    ("EleutherAI/pythia-70m-deduped", 70_426_624),
    ("openai-community/gpt2", 124_439_808),
    ("openai-community/gpt2-medium", 354_823_168),
])
def test_shipped_configs_build_the_real_architectures(name, params):
    from transformers import AutoModelForCausalLM

    from raysae.models import model_hf_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_hf_config(ModelConfig(name=name)))
    assert sum(p.numel() for p in model.parameters()) == params


def test_paper_plan_matches_the_closed_forms(tmp_path):
    job = dataclasses.replace(load_config(PAPER), runs_dir=str(tmp_path))
    job, why, phases = job_costs(job)
    assert job.train.source == "streamed" and "as the config says" in why
    by = {p.name: p for p in phases}
    # streamed: no cache phase; both compute plans read the 500M runs' 100M checkpoints
    assert list(by) == ["scratch", "transfer"]
    d, F, B = 768, 6144, 10**9
    scratch = by["scratch"]
    assert (scratch.groups, scratch.saes, scratch.stream_tokens) == (1, 12, B)
    assert scratch.lm_flops == pytest.approx(B * 24 * d * d * 12)  # one forward for 12 SAEs
    assert scratch.sae_flops == pytest.approx(12 * B * 10 * d * F)  # five dense products
    transfer = by["transfer"]
    assert (transfer.groups, transfer.saes, transfer.stream_tokens) == (1, 22, B // 2)
    assert transfer.sae_tokens == 22 * B // 2
    assert transfer.memory_per_worker < job.train.worker_memory_gb * costs.GiB


def test_groups_split_to_fit_the_worker_memory(tmp_path):
    job = dataclasses.replace(load_config(PAPER), runs_dir=str(tmp_path))
    small = dataclasses.replace(job, train=dataclasses.replace(job.train, worker_memory_gb=12))
    _, _, phases = job_costs(small)
    scratch = phases[0]
    assert scratch.groups > 1 and scratch.memory_per_worker <= 12 * costs.GiB
    capped = dataclasses.replace(job, train=dataclasses.replace(job.train, max_group_saes=5))
    assert job_costs(capped)[2][0].groups == 3  # 12 SAEs, at most 5 a group
    assert costs.pack([3, 3, 3, 9, 1], capacity=7) == [[0, 1], [2], [3], [4]]
    assert costs.pack([1, 1, 1], capacity=100, max_count=2) == [[0, 1], [2]]


def test_auto_source_and_a_cache_beyond_the_disk(tmp_path, token_file):
    job = build_cfg(tmp_path, token_file)
    free = costs.free_bytes(tmp_path)
    assert costs.choose_source(job, 10**6, reads=2, free=free)[0] == "cached"
    assert costs.choose_source(job, 10**6, reads=1, free=free)[0] == "streamed"
    source, why = costs.choose_source(job, 10 * free, reads=3, free=free)
    assert source == "streamed" and "free in runs_dir" in why
    huge = dataclasses.replace(job, data=DataConfig(source=str(token_file), context_length=16,
                                                    num_tokens=10**15))
    cached = dataclasses.replace(huge, train=dataclasses.replace(huge.train, source="cached"))
    need = costs.shard_bytes(cached)
    assert need == 10**15 * 64 * 4 * 2  # tokens x d_model x float32 x 2 sites
    with pytest.raises(ConfigError, match=rf"cached needs {need:,} bytes .* set train.source: streamed"):
        costs.resolve_source(cached, reads=3)
    assert costs.resolve_source(huge, reads=3)[0].train.source == "streamed"


def test_memory_of_an_sae_by_hand():
    sae = SAEConfig(architecture="relu", d_sae=100)
    params = 2 * 10 * 100 + 100 + 10
    assert costs.sae_memory_bytes(sae, 10, 8) == 16 * params + 12 * 8 * 100 + 8 * 100


def test_plan_command_prints_the_table(tmp_path, capsys):
    assert main(["plan", str(PAPER), "--runs-dir", str(tmp_path), "--no-calibrate"]) == 0
    out = capsys.readouterr().out
    assert "activation source streamed" in out and "| scratch | 1 | 12 | 1,000,000,000 |" in out


def test_store_per_checkpoint_is_what_the_saves_write(tmp_path):
    """The plan's bytes per parameter are the files' sizes: an SAE folder is its float32
    weights, a training state its weights and Adam's two moments (plus headers, the JSON and
    the per-latent counters)."""
    from raysae.checkpoint import save_train_state
    from raysae.config import TrainConfig
    from raysae.sae import SAE
    from raysae.train import run_trainer, sae_trainer

    d, F = 32, 256
    cfg = SAEConfig(architecture="relu", d_sae=F)
    sae = SAE(cfg, d)
    train = TrainConfig(num_tokens=64, batch_size=32, checkpoint_every_tokens=64)
    state = run_trainer(sae_trainer(sae, train), [torch.randn(32, d) for _ in range(2)])
    params = cfg.spec.parameters(d, F)
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
    folder, kept = sae.save(tmp_path / "sae"), save_train_state(state, tmp_path / "state")
    assert [len(list(p.iterdir())) for p in (folder, kept)] == [costs.FILES_PER_FOLDER] * 2
    assert 0 <= size(folder) - costs.FOLDER_BYTES_PER_PARAM * params < 8192
    assert 0 <= size(kept) - costs.STATE_BYTES_PER_PARAM * params < 8192 + 16 * F


def test_store_of_a_group_and_of_the_paper_plan(tmp_path):
    job = dataclasses.replace(load_config(PAPER), runs_dir=str(tmp_path))
    d, F = 768, 6144
    P = 2 * d * F + F + d
    assert job.train.checkpoint_every_tokens == 100_000_000
    saes = [costs.SAECost(job.model, f"blocks.{i}.hook_resid_post", job.sae, b)
            for i, b in ((0, 10**9), (1, 250_000_000))]
    # 10 and 3 checkpoints (250M: 100M, 200M, 250M), each a state and a folder, plus the ends;
    # a commit's group.json for each of the group's 10 commits; streamed: nothing read back
    got = costs.group_store(job, d, saes, streamed=True)
    assert got.written == (10 + 3) * P * (12 + 4) + 2 * P * 4
    assert got.files == 2 * (2 * 10 + 1) + 2 * (2 * 3 + 1) + 10
    assert got.read == 0
    # cached: each site's shards for the group's tokens, in the cache's dtype (2 bytes)
    assert job.cache.dtype == "bfloat16"
    assert costs.group_store(job, d, saes, streamed=False).read == 10**9 * d * 2 * 2
    by = {p.name: p for p in job_costs(job)[2]}
    assert by["scratch"].store.written == 12 * (10 * P * 16 + P * 4)
    assert by["transfer"].store.written == 22 * (5 * P * 16 + P * 4)
    report = costs.cost_report(job, "streamed", list(by.values()))
    assert "| scratch | 17.3 GiB | 514 | 0 B |" in report and "store total: 33.6 GiB" in report
