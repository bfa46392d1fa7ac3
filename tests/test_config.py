"""Config loading: every mistake is named with its field, its value and what is allowed."""

from __future__ import annotations

from pathlib import Path

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
        ({"faithfulness_n": [0.02, 2.5]},
         "features.faithfulness_n: got (0.02, 2.5), expected a non-empty list"),
        ({"completeness_n": []}, "features.completeness_n"),
        ({"top_n": [4]}, "unknown field features.'top_n'"),
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
    cfg.write_text(yaml.safe_dump({**BASE, "train": {"num_tokens": 960, "batch_size": 64},
                                   "features": {"tasks": ["ioi", "nosuchtask"]}}))
    assert main(["check", str(cfg), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "task source 'nosuchtask': unknown task" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was written


def check(tmp_path, data: dict, capsys) -> str:
    """`raysae check` on `data`: the error it prints ("" when the config is OK)."""
    from raysae.cli import main

    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(data))
    rc = main(["check", str(cfg), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert (rc == 0) == (err == ""), err
    return err


@pytest.fixture
def checked(token_file) -> dict:
    """BASE with a token file that exists and a budget its 1,000 tokens give, so that
    `raysae check` passes it."""
    return {**BASE, "data": {**BASE["data"], "source": str(token_file)},
            "train": {"num_tokens": 960, "batch_size": 64}}


def test_a_budget_beyond_the_data_is_refused_by_check(tmp_path, checked, capsys):
    """1,000 tokens in windows of 16: 63 windows, 1,008 tokens; in batches of 64, 960 a pass
    (the streamed source's own count; a cache holds no more)."""
    train = checked["train"]
    err = check(tmp_path, {**checked, "train": {**train, "num_tokens": 961}}, capsys)
    assert ("train.num_tokens: a budget of 961 tokens, but the data gives 960 in 1 pass(es) over "
            "data.num_tokens (1,000); raise data.num_tokens or set train.data_passes to 2") in err
    assert "Traceback" not in err
    assert check(tmp_path, {**checked, "train": {**train, "num_tokens": 961, "data_passes": 2}},
                 capsys) == ""
    # two workers: each takes 32 rows of every batch from its own half of the 2 shards
    two = {**train, "num_workers": 2, "source": "cached"}
    err = check(tmp_path, {**checked, "train": two}, capsys)
    assert "the cache: 1 shards cannot feed 2 workers disjoint data" in err
    cache = {**checked["cache"], "shard_tokens": 512}  # 32 windows a shard: 2 shards of 512, 496
    assert check(tmp_path, {**checked, "cache": cache, "train": {**two, "num_tokens": 960}},
                 capsys) == ""
    err = check(tmp_path, {**checked, "cache": cache, "train": {**two, "num_tokens": 1024}}, capsys)
    assert "train.num_tokens: a budget of 1,024 tokens, but the data gives 960" in err
    err = check(tmp_path, {**checked, "train": {**train, "batch_size": 63, "num_workers": 2}}, capsys)
    assert "train.batch_size: 63 is not divisible by train.num_workers (2)" in err
    # a sweep's fine-tuning budget, read against the same data
    sweep = {"layers": [0, 1], "finetune_budgets": [512, 2048], "compute_plan": False}
    cache = {**checked["cache"], "layers": [0, 1, 2]}
    err = check(tmp_path, {**checked, "cache": cache, "sweep": sweep}, capsys)
    assert "sweep.finetune_budgets: a budget of 2,048 tokens, but the data gives 960" in err


def stitch_job(checked: dict, probe_file, **stitch) -> dict:
    """A stitch job of the tiny model onto itself, its probes on `probe_file`."""
    base = {"large": {"name": "tiny-b", "from_config": TINY_NEOX}, "pairs": [[1, 1]],
            "widths": [64], "num_tokens": 512, "batch_size": 64, "budgets": [512, 960],
            "lstsq_tokens": 256, "match_tokens": 256, "checkpoint_every_tokens": 512,
            "probes": {"source": str(probe_file), "labels": ["topic"], "num_rows": 8}}
    return {**checked, "stitch": {**base, **stitch}}


@pytest.fixture
def probe_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "probes.parquet"
    pq.write_table(pa.table({"input_ids": [[0, 5, 6, 7]] * 8, "topic": [[0, 1, 1, 0]] * 8}), path)
    return path


def test_stitch_budgets_probe_labels_and_feature_counts_are_refused_by_check(
        tmp_path, checked, probe_file, capsys):
    assert check(tmp_path, stitch_job(checked, probe_file), capsys) == ""
    err = check(tmp_path, stitch_job(checked, probe_file, budgets=[512, 4096]), capsys)
    assert "stitch.budgets: a budget of 4,096 tokens, but the data gives 960" in err
    err = check(tmp_path, stitch_job(checked, probe_file, num_tokens=2048), capsys)
    assert "stitch.num_tokens: a budget of 2,048 tokens, but the data gives 960" in err
    # every label a column of the probe data, and the steering label too
    probes = {"source": str(probe_file), "labels": ["topic", "mood"], "num_rows": 8}
    err = check(tmp_path, stitch_job(checked, probe_file, probes=probes), capsys)
    assert f"stitch.probes.labels: label 'mood' is not a column of {str(probe_file)!r}" in err
    assert "columns: ['input_ids', 'topic']" in err and "Traceback" not in err
    probes = {"source": str(probe_file), "labels": ["topic"], "steering_label": "depth"}
    err = check(tmp_path, stitch_job(checked, probe_file, probes=probes), capsys)
    assert "stitch.probes.steering_label 'depth' is not a column" in err
    # circuit sizes given as counts must fit the SAEs' width (64 here): never cut to it
    features = {"tasks": ["ioi"], "faithfulness_n": [0.5, 64], "completeness_n": [4, 100]}
    err = check(tmp_path, {**stitch_job(checked, probe_file), "features": features}, capsys)
    assert ("features.completeness_n: got feature counts [100], expected at most the smallest SAE "
            "width (64, of the widths [64])") in err
    features = {**features, "completeness_n": [4, 64]}
    assert check(tmp_path, {**stitch_job(checked, probe_file), "features": features}, capsys) == ""
    # a layer sweep's SAEs: expansion_factor 8 x d_model 64 = 512
    sweep = {"layers": [0, 1], "finetune_budgets": [512], "compute_plan": False}
    features = {"tasks": ["ioi"], "faithfulness_n": [513]}
    cache = {**checked["cache"], "layers": [0, 1, 2]}
    err = check(tmp_path, {**checked, "cache": cache, "sweep": sweep, "features": features}, capsys)
    assert "features.faithfulness_n: got feature counts [513], expected at most the smallest SAE width (512" in err


def test_topk_k_above_the_width_is_refused(tmp_path, checked, capsys):
    with pytest.raises(ConfigError, match=r"sae\.k: got 100000, expected at most sae\.d_sae \(512\)"):
        from_dict(JobConfig, {**BASE, "sae": {"architecture": "topk", "k": 100000, "d_sae": 512}})
    SAEConfig(architecture="relu", k=100000, d_sae=512)  # k is a topk setting only
    # d_sae = expansion_factor x d_model: only `check` knows d_model (64 for TINY_NEOX)
    err = check(tmp_path, {**checked, "sae": {"architecture": "topk", "k": 600}}, capsys)
    assert "sae.k: got 600, expected at most d_sae (512 = sae.expansion_factor 8 x d_model 64" in err
    assert check(tmp_path, {**checked, "sae": {"architecture": "topk", "k": 512}}, capsys) == ""


@pytest.mark.parametrize(
    ("section", "yaml_text", "message"),
    [
        ("train", "{lr: .nan}", "train.lr: got nan, expected a finite number"),
        ("train", "{adam_betas: [0.0, .inf]}", "train.adam_betas[1]: got inf, expected a finite number"),
        ("sae", "{l1_coefficient: -.inf}", "sae.l1_coefficient: got -inf, expected a finite number"),
        ("cache", "{actor_cpus: .NaN}", "cache.actor_cpus: got nan, expected a finite number"),
    ],
)
def test_float_settings_must_be_finite(tmp_path, section, yaml_text, message):
    rest = {k: v for k, v in BASE.items() if k != section}
    path = tmp_path / "job.yaml"
    path.write_text(f"{yaml.safe_dump(rest)}{section}: {yaml_text}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value)


def test_sweep_layer_outside_the_cache_and_the_model(tmp_path, checked, capsys):
    sweep = {"layers": [0, 7], "finetune_budgets": [4096]}
    data = {**checked, "cache": {"layers": [0, 1, 2]}, "sweep": sweep}
    err = check(tmp_path, data, capsys)
    assert "sweep.layers: layer 7 is not cached: expected layers of cache.layers [0, 1, 2]" in err
    assert "'tiny' has 3 blocks (0..2)" in err


@pytest.mark.parametrize("source", ["./data/missing.parquet", "missing.jsonl", "/abs/missing"])
def test_missing_local_data_source_is_refused(tmp_path, checked, capsys, source):
    err = check(tmp_path, {**checked, "data": {**checked["data"], "source": source}}, capsys)
    assert f"data.source: no file or folder at {source!r}" in err


def test_a_hub_dataset_name_is_not_taken_for_a_path(tmp_path, checked, capsys):
    for source in ("NeelNanda/pile-small-tokenized-2b", "wikitext"):
        assert check(tmp_path, {**checked, "data": {**checked["data"], "source": source}}, capsys) == ""


@pytest.mark.parametrize("name", ["../../escape", "a/b", ".hidden", "-flag", "two words", ""])
def test_job_name_must_be_a_safe_folder_name(name):
    with pytest.raises(ConfigError) as e:
        from_dict(JobConfig, {**BASE, "name": name})
    assert f"name: got {name!r}, expected letters, digits, '.', '_' and '-'" in str(e.value)


def test_job_name_too_long_for_a_folder_is_refused_by_check(tmp_path, checked, capsys):
    """Its longest Tune folder (`<name>-<digest>-stitch-transfer`) must fit 255 bytes."""
    from raysae.config import NAME_MAX

    assert check(tmp_path, {**checked, "name": "n" * NAME_MAX}, capsys) == ""
    err = check(tmp_path, {**checked, "name": "n" * (NAME_MAX + 1)}, capsys)
    assert f"name: got '{NAME_MAX + 1} characters', expected at most {NAME_MAX}" in err
    assert "Traceback" not in err
    long_folder = tmp_path / ("n" * NAME_MAX + "-0123456789abcdef-stitch-transfer")
    long_folder.mkdir()  # the longest it allows is a folder this file system makes
    with pytest.raises(OSError):
        (tmp_path / (long_folder.name + "x")).mkdir()


def test_job_name_accepts_plain_names():
    for name in ("pythia160m-layer-transfer", "run_1.2", "A"):
        assert from_dict(JobConfig, {**BASE, "name": name}).name == name


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: t\nmodel: {name: x\ndata: [1,\n")
    with pytest.raises(ConfigError, match=rf"{path}:3:5: invalid YAML: expected ',' or '}}'"):
        load_config(path)


@pytest.mark.parametrize("name", ["./models/missing", "/abs/missing", "~/no/such/model", "a/b/c"])
def test_missing_model_folder_is_not_sent_to_the_hub(tmp_path, checked, capsys, name):
    err = check(tmp_path, {**checked, "model": {"name": name}}, capsys)
    assert f"no model folder at {name!r} and not a hub name" in err


def test_local_path_tells_paths_from_hub_names(tmp_path):
    from raysae.config import local_path

    for name in ("gpt2", "EleutherAI/pythia-70m-deduped", "org/model-v1.5"):
        assert local_path(name) is None
    for name in ("./m", "../m", "/m", "a/b/c", "tokens.parquet", "x.jsonl"):
        assert local_path(name) is not None


def test_the_driver_fixes_its_tracking_uri_into_the_job(tmp_path, checked, monkeypatch):
    """The job a driver sends its tasks and workers names the tracking URI: theirs is never read
    from their own environment (a node with another MLFLOW_TRACKING_URI, or none)."""
    import argparse

    from raysae.cli import _load
    from raysae.config import from_dict, sweep_digest, to_dict

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(checked))
    args = argparse.Namespace(config=str(path), runs_dir=str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = _load(args)
    assert local.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    served = _load(args)
    assert served.tracking_uri == "http://127.0.0.1:5000"
    # what a task receives (to_dict, from_dict) keeps it; another store is not another sweep
    assert from_dict(JobConfig, to_dict(served)).tracking_uri == "http://127.0.0.1:5000"
    assert sweep_digest(served) == sweep_digest(local)
    path.write_text(yaml.safe_dump({**checked, "tracking_uri": "http://10.0.0.1:5000"}))
    assert _load(args).tracking_uri == "http://10.0.0.1:5000"  # the config's own, over the variable
    assert not (tmp_path / "runs").exists()  # resolving it writes nothing
    # the analysis scripts find the same store: --tracking-uri (the job's), else as the driver
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "analysis"))
    from common import tracking_uri

    store = argparse.Namespace(runs_dir=args.runs_dir, tracking_uri=None)
    assert tracking_uri(store) == "http://127.0.0.1:5000"
    assert tracking_uri(argparse.Namespace(**{**vars(store), "tracking_uri": "http://10.0.0.1:5000"})
                        ) == "http://10.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(store) == local.tracking_uri
