"""cluster.yaml passes Ray's own cluster-launcher schema (offline, no cloud credentials)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent


def load() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid():
    cfg = load()
    validate_config(prepare_config(copy.deepcopy(cfg)))
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["max_workers"] >= 1
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])
    assert any("torch==2.13.0" in c for c in cfg["setup_commands"])


def test_schema_catches_mistakes():
    cfg = load()
    cfg["available_node_types"]["gpu_worker"]["max_wrokers"] = 3
    with pytest.raises(Exception, match="max_wrokers"):
        validate_config(prepare_config(cfg))
