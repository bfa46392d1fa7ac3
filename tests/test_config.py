"""Config loading: every mistake is named with its field, its value and what is allowed."""

from __future__ import annotations

import pytest
import yaml
from conftest import TINY_NEOX

from raysae.config import (
    CacheConfig,
    ConfigError,
    JobConfig,
    SAEConfig,
    TrainConfig,
    flatten,
    from_dict,
    load_config,
    to_dict,
)
from raysae.features.tasks import check_task_source

BASE = {
    "name": "t",
    "model": {"name": "tiny", "from_config": TINY_NEOX},
    "data": {"source": "tokens.parquet", "context_length": 16, "num_tokens": 1e3},
    "cache": {"layers": [0, 2], "sites": ["resid_post", "resid_pre"]},
}


def write(tmp_path, data):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.cache.layers == (0, 2) and cfg.data.num_tokens == 1000
    assert from_dict(JobConfig, to_dict(cfg)) == cfg
    flat = flatten(cfg)
    assert flat["cache.layers"] == "[0, 2]" and flat["model.trust_remote_code"] == "False"


@pytest.mark.parametrize(
    ("path", "value", "pattern"),
    [
        (("cache", "layerz"), [0], r"unknown field cache\.'layerz'.*allowed fields: sites, layers"),
        (("data", "context_length"), "16", r"data\.context_length: got '16' \(str\), expected int"),
        (("cache", "sites"), ["resid_mid"], r"cache\.sites\[0\]: got 'resid_mid', expected one of 'resid_pre', 'resid_post'"),
        (("cache", "dtype"), "int8", r"cache\.dtype: got 'int8', expected one of 'float32'"),
        (("model", "trust_remote_code"), "yes", r"model\.trust_remote_code: got 'yes'"),
        (("cache", "layers"), [1, 1], r"cache\.layers: got \(1, 1\), expected no repeated layers"),
        (("data", "num_tokens"), 8, r"data\.num_tokens: got 8, expected >= context_length \(16\)"),
    ],
)
def test_errors_name_field_value_and_allowed(tmp_path, path, value, pattern):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data[path[0]][path[1]] = value
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, data))


def test_missing_file_and_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match=r"JobConfig.*model"):
        from_dict(JobConfig, {"name": "x", "data": BASE["data"]})


def test_sae_and_train_validation():
    with pytest.raises(ConfigError, match=r"architecture: got 'gated', expected one of 'relu', 'topk', 'jumprelu'"):
        from_dict(SAEConfig, {"architecture": "gated"})
    with pytest.raises(ConfigError, match=r"train\.adam_betas"):
        TrainConfig(adam_betas=(0.9,))
    with pytest.raises(ConfigError, match=r"train\.lr_decay_frac"):
        TrainConfig(lr_warmup_frac=0.5, lr_decay_frac=0.6)
    with pytest.raises(ConfigError, match=r"cache\.batch_size: got 0"):
        CacheConfig(batch_size=0)
    assert SAEConfig(expansion_factor=8).width(64) == 512


# Depths of the real models the shipped configs name (their HF configs' num_hidden_layers).
KNOWN_DEPTHS = {
    "EleutherAI/pythia-70m-deduped": 6,
    "EleutherAI/pythia-160m-deduped": 12,
    "openai-community/gpt2": 12,
    "openai-community/gpt2-medium": 24,
}


def test_shipped_configs_load_and_fit_their_models():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parent.parent / "jobs" / "configs").glob("*.yaml"))
    assert len(configs) >= 6
    for path in configs:
        cfg = load_config(path)
        if cfg.model.name.startswith("toy://"):
            assert cfg.data.source.startswith("toy://")
            continue
        depth = KNOWN_DEPTHS[cfg.model.name]
        assert all(0 <= i < depth for i in cfg.cache.layers), path.name
        if cfg.stitch is not None:
            depth_b = KNOWN_DEPTHS[cfg.stitch.large.name]
            assert all(0 <= a < depth and 0 <= b < depth_b for a, b in cfg.stitch.pairs), path.name
            assert all(0 <= a < depth for a in cfg.stitch.match_layers), path.name
        assert cfg.train.batch_size % cfg.train.num_workers == 0
        for source in cfg.features.tasks if cfg.features else ():
            check_task_source(source)  # shipped template names resolve to files that parse


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ({"top_n": [0.02, 2.5]}, "features.top_n: got (0.02, 2.5), expected a non-empty list"),
        ({"top_n": []}, "features.top_n"),
        ({"examples_per_task": 1}, "features.examples_per_task: got 1, expected at least 2"),
        ({"exact_check_features": -1}, "features.exact_check_features: got -1"),
        ({"checkpoints": "some"}, "features.checkpoints: got 'some', expected one of 'all', 'final'"),
        ({"tasks": [], "dashboard_features": 0}, "features.tasks: got (), expected at least one"),
        ({"tasks": "ioi"}, "features.tasks: got 'ioi', expected a list"),
    ],
)
def test_features_config_errors(features: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(JobConfig, {**BASE, "features": features})
    assert message in str(e.value)


def test_bad_task_source_is_caught_by_check_before_any_work(tmp_path, capsys) -> None:
    from raysae.cli import main

    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "features": {"tasks": ["ioi", "nosuchtask"]}}))
    assert main(["check", str(cfg), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "task source 'nosuchtask': unknown task" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was written
