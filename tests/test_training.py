"""Ray Train end to end: real data parallelism, MLflow logging, and recovery from a killed worker."""

from __future__ import annotations

import dataclasses
import json

import chaos
import pytest
import ray.cloudpickle
from chaos import Trace, row_digest
from conftest import build_cfg
from mlflow.tracking import MlflowClient

from raysae import shards
from raysae.config import CacheConfig, DataConfig, SAEConfig, TrainConfig
from raysae.sae import SAE
from raysae.tracking import RUN_KEY_TAG, tracking_uri

pytestmark = pytest.mark.ray
ray.cloudpickle.register_pickle_by_value(chaos)  # the hooks run on the Train workers

BUDGET = 8192


@pytest.fixture(scope="module")
def job(ray_local, tmp_path_factory, token_file):
    from raysae.distributed.caching import cache_activations

    tmp = tmp_path_factory.mktemp("train")
    cfg = build_cfg(tmp, token_file)
    cfg = dataclasses.replace(
        cfg,
        data=DataConfig(source=str(token_file), context_length=16, num_tokens=1024),
        cache=CacheConfig(layers=(1,), shard_tokens=128, out_dir=str(tmp / "acts")),
        sae=SAEConfig(architecture="relu", expansion_factor=4, l1_coefficient=1e-3),
        train=TrainConfig(num_tokens=BUDGET, batch_size=256, lr=3e-3, checkpoint_every_tokens=2048,
                          eval_tokens=128, num_workers=2, log_every_steps=4, lr_warmup_frac=0.0,
                          lr_decay_frac=0.0, l1_warmup_frac=0.0),
    )
    dirs = cache_activations(cfg)
    return cfg, dirs["blocks.1.hook_resid_post"]


def spec(directory, key):
    from raysae.distributed.training import TrainSpec

    return TrainSpec(key=key, name=key, shards_dir=str(directory), tags={"raysae.layer": "1"})


def shard_rows(directory, files):
    reader = shards.ActivationReader(directory)
    infos = [s for s in reader.manifest.shards if s.file in files]
    rows = set()
    for info in infos:
        for r in reader.vectors(reader.read_shard(info)):
            rows.add(row_digest(r))
    return rows


def mlflow_run(cfg, key):
    client = MlflowClient(tracking_uri(cfg.runs_dir))
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'")
    assert len(runs) == 1, f"expected exactly one MLflow run for {key}, found {len(runs)}"
    return client, runs[0]


@pytest.fixture(scope="module")
def uninterrupted(job, tmp_path_factory):
    from raysae.distributed.training import train_on_ray

    cfg, directory = job
    debug = tmp_path_factory.mktemp("debug")
    return train_on_ray(cfg, spec(directory, "plain"), hooks=Trace(str(debug))), debug


def test_data_parallel_training_lowers_loss_and_logs(job, uninterrupted):
    cfg, directory = job
    result, debug = uninterrupted
    ranks = [json.loads((debug / f"rank{r}-from0.json").read_text()) for r in (0, 1)]
    # the same SAE on both workers before every step and at the end
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == BUDGET // 256
    for a, b in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert a["params_before"] == b["params_before"]
    assert ranks[0]["final"] == ranks[1]["final"]
    # disjoint data: each worker's shards are its own, and it only saw rows from them
    assert not set(ranks[0]["shards"]) & set(ranks[1]["shards"])
    for r in ranks:
        seen = {row for s in r["steps"] for row in s["rows"]}
        assert seen <= shard_rows(directory, r["shards"])
        assert sum(len(s["rows"]) for s in r["steps"]) == BUDGET // 2

    client, run = mlflow_run(cfg, "plain")
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_tokens"] == str(BUDGET)
    assert run.data.tags["raysae.layer"] == "1" and run.data.tags["raysae.tokens_seen"] == str(BUDGET)
    mse = client.get_metric_history(run.info.run_id, "train/mse")
    assert mse[-1].step == BUDGET and mse[-1].value < 0.5 * mse[0].value
    ev = client.get_metric_history(run.info.run_id, "eval/explained_variance")
    assert [m.step for m in ev] == [2048, 4096, 6144, 8192]  # metrics at every checkpoint
    assert ev[-1].value > 0.5
    assert {a.path for a in client.list_artifacts(run.info.run_id, "sae")} == {
        "sae/cfg.json", "sae/sae_weights.safetensors"}
    assert SAE.load(result.out_dir).d_sae == 256
    assert result.run_id == run.info.run_id


def test_killed_worker_resumes_from_checkpoint_with_exact_budget(job, uninterrupted, tmp_path):
    from raysae.distributed.training import train_on_ray

    cfg, directory = job
    marker = tmp_path / "killed"
    debug = tmp_path / "debug"
    hooks = Trace(str(debug), kill_at_tokens=5000, marker=str(marker), kill_rank=1)
    result = train_on_ray(cfg, spec(directory, "killed"), hooks=hooks)
    assert marker.exists()  # the worker really died once
    # the second attempt started from the 4096-token checkpoint, not from scratch
    resumed = {p.name for p in debug.iterdir()}
    assert resumed == {"rank0-from16.json", "rank1-from16.json"}
    steps = json.loads((debug / "rank0-from16.json").read_text())["steps"]
    assert (16 + len(steps)) * 256 == BUDGET
    client, run = mlflow_run(cfg, "killed")  # one MLflow run, continued
    assert run.info.status == "FINISHED"
    tokens = [m.step for m in client.get_metric_history(run.info.run_id, "tokens_seen")]
    assert max(tokens) == BUDGET
    # identical to the uninterrupted run: same data order, same optimiser state
    plain, _ = uninterrupted
    a, b = SAE.load(plain.out_dir), SAE.load(result.out_dir)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert (getattr(a, name) - getattr(b, name)).abs().max() < 1e-6, name


def test_rerun_of_finished_training_is_reused(job, uninterrupted):
    from raysae.distributed.training import train_on_ray

    cfg, directory = job
    plain, _ = uninterrupted
    again = train_on_ray(cfg, spec(directory, "plain"))
    assert again.run_id == plain.run_id
    assert again.metrics["tokens_seen"] == BUDGET
    mlflow_run(cfg, "plain")
