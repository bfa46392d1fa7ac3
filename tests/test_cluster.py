"""cluster.yaml passes Ray's own cluster-launcher schema (offline, no cloud credentials)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent


def load() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


# What AWS's DescribeInstanceTypes gives `ray up` for the two types (vCPUs, GPUs, GPU memory).
INSTANCES = {"m6i.2xlarge": {"CPU": 8}, "p4de.24xlarge": {"CPU": 96, "GPU": 8}}
GPU_MEMORY_GB = {"p4de.24xlarge": 80}


def test_cluster_yaml_is_valid():
    cfg = load()
    validate_config(prepare_config(copy.deepcopy(cfg)))
    types = cfg["available_node_types"]
    # resources detected from the instance types, never declared by hand
    assert all(t["resources"] == {} for t in types.values())
    assert "resolve:ssm:/aws/service/deeplearning/" in types["gpu_worker"]["node_config"]["ImageId"]
    assert types["gpu_worker"]["max_workers"] >= 1
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])
    assert any("torch==2.13.0" in c for c in cfg["setup_commands"])
    # the tracking server on the head's private address, its artifacts on the shared store
    [server] = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    assert "--host $(hostname -I" in server and "0.0.0.0" not in server
    assert "--artifacts-destination /mnt/raysae/" in server
    assert any("MLFLOW_TRACKING_URI=http://" in c and "RAYSAE_RUNS_DIR=/mnt/raysae/runs" in c
               for c in cfg["setup_commands"])


def test_paper_configs_fit_the_worker_type_and_fill_the_pool(monkeypatch):
    """The paper configs' per-worker GPU memory fits the worker type; the phases run as many
    groups at once as the pool can grow to (16 GPUs), not the 0 GPUs present at min_workers 0."""
    from raysae.config import load_config
    from raysae.distributed.engine.phases import autoscaler_max, fits_at_once

    cfg = load()
    gpu_type = cfg["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"]
    job = load_config(ROOT / "jobs" / "configs" / "pythia160m_layers.yaml")
    assert job.train.worker_memory_gb <= GPU_MEMORY_GB[gpu_type]
    for t in cfg["available_node_types"].values():  # as `ray up` fills them in
        t["resources"] = INSTANCES[t["node_config"]["InstanceType"]]
    most = autoscaler_max(cfg)
    assert most == {"CPU": 8 + 2 * 96, "GPU": 16}
    gpu_job = dataclasses.replace(job, train=dataclasses.replace(job.train, use_gpu=True, num_workers=1))
    server = dataclasses.replace(gpu_job, runs_dir="/mnt/raysae/runs")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    n, why = fits_at_once(gpu_job, most, "the autoscaler's maximum")  # sqlite: its writers queue
    assert n == 2 and why.endswith("at most 2 on a sqlite MLflow store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    n, why = fits_at_once(server, most, "the autoscaler's maximum")
    assert (n, why) == (16, "16 GPUs / 1 per group, the autoscaler's maximum")
    n, why = fits_at_once(server, {"CPU": 8}, "the resources present now")
    assert n == 1 and why.startswith("0 GPUs / 1 per group")
    # the cluster's own max_workers caps the pool
    assert autoscaler_max({**cfg, "max_workers": 1})["GPU"] == 8


def test_schema_catches_mistakes():
    cfg = load()
    cfg["available_node_types"]["gpu_worker"]["max_wrokers"] = 3
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(prepare_config(cfg))


def test_capacity_is_read_from_the_autoscaler_config_on_the_head(tmp_path, monkeypatch):
    from raysae.distributed.engine.phases import cluster_capacity

    cfg = load()
    for t in cfg["available_node_types"].values():
        t["resources"] = INSTANCES[t["node_config"]["InstanceType"]]
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    present = {"CPU": 8.0, "memory": 1e9}  # the head alone, at min_workers 0
    monkeypatch.setenv("RAYSAE_CLUSTER_CONFIG", str(path))
    assert cluster_capacity(present) == ({"CPU": 200.0, "GPU": 16.0, "memory": 1e9},
                                         f"the autoscaler's maximum in {path}")
    monkeypatch.setenv("RAYSAE_CLUSTER_CONFIG", str(tmp_path / "none.yaml"))
    assert cluster_capacity(present) == (present, "the resources present now (no autoscaler config)")
