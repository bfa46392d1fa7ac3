"""A sweep on a Ray cluster of three nodes on this machine (separate raylets, their own
resources): the groups run on more than one node, and a whole node removed in the middle of a
training phase is survived: the sweep completes, every run exactly once, every budget exact,
and no checkpoint lost beyond the last committed one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import polars as pl
import pytest
import yaml
from conftest import TINY_NEOX, driver_env

pytestmark = pytest.mark.ray

CONFIG = {
    "name": "cluster-test",
    "model": {"name": "tiny-neox", "from_config": TINY_NEOX},
    "data": {"context_length": 16, "num_tokens": 1024},
    "cache": {"layers": [0, 1], "shard_tokens": 256},
    "sae": {"architecture": "topk", "expansion_factor": 2, "k": 8},
    # one SAE per group: the scratch phase's two groups can run on two nodes at once
    "train": {"num_tokens": 4096, "batch_size": 256, "lr": 1e-3, "checkpoint_every_tokens": 1024,
              "eval_tokens": 128, "log_every_steps": 2, "data_passes": 5, "max_group_saes": 1,
              "source": "cached"},
    "sweep": {"layers": [0, 1], "finetune_budgets": [4096], "finetune_lr": 1e-3,
              "compute_plan": False, "max_failures": 3},
}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": 100_000_000})
    workers = [c.add_node(num_cpus=1, object_store_memory=100_000_000) for _ in range(2)]
    c.wait_for_nodes()
    yield c, workers
    c.shutdown()


def runs_table(runs: Path) -> pl.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
    df = mlflow.search_runs(experiment_names=["cluster-test"])
    return pl.from_pandas(df.astype({c: str for c in df.columns if c.startswith("tags.")}))


def training_nodes(runs: Path) -> dict[str, set[str]]:
    """node id -> the SAE runs training on it now, at least two checkpoints short of their
    budget (so that a run cannot finish in the moment between this query and the removal; the
    database exists once a checkpoint does)."""
    client = mlflow.tracking.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cluster-test")
    running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    busy: dict[str, set[str]] = {}
    for r in running:
        if 0 < r.data.metrics.get("tokens_seen", 0) < 2048:
            busy.setdefault(r.data.tags.get("raysae.nodes", "").split(",")[-1], set()).add(r.info.run_id)
    return busy


def lose(c, node) -> None:
    """A lost machine: every process of the node dies at once. The raylet killed alone leaves
    its workers (its children) running for a moment, long enough to finish a short training
    on a node already removed, so they are killed first."""
    for raylet in node.all_processes["raylet"]:
        kids = subprocess.run(["pgrep", "-P", str(raylet.process.pid)], capture_output=True,
                              text=True).stdout.split()
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    c.remove_node(node, allow_graceful=False)


def test_sweep_survives_a_lost_node(cluster, tmp_path, token_file):
    c, workers = cluster
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump({**CONFIG, "data": {**CONFIG["data"], "source": str(token_file)}}))
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "raysae.cli", "sweep", str(cfg_path), "--runs-dir", str(runs)]
    driver = subprocess.Popen(cmd, env=driver_env(RAY_ADDRESS=c.address), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    # once a training has committed a checkpoint, remove a worker node that is training
    removed, interrupted = None, set()
    deadline = time.time() + 400
    while removed is None and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
        if not list((runs / "checkpoints").glob("*/tokens_*")):
            continue
        busy = training_nodes(runs)
        node = next((w for w in workers if w.node_id in busy), None)
        if node is not None:
            c.remove_node(node, allow_graceful=False)
            removed, interrupted, removed_at = node.node_id, busy[node.node_id], time.time()
    out, _ = driver.communicate(timeout=900)
    assert removed is not None, f"the sweep ended before a node could be removed:\n{out[-3000:]}"
    assert driver.returncode == 0, out[-5000:]

    df = runs_table(runs)
    trained = df.filter(pl.col("tags.raysae.phase").is_in(["scratch", "transfer"]))
    # every run exactly once, finished, at exactly its budget
    assert trained["tags.raysae.run_key"].n_unique() == trained.height == 4  # 2 scratch, fwd, bwd
    assert (trained["status"] == "FINISHED").all()
    assert (trained["metrics.tokens_seen"] == 4096).all()
    # the groups ran on more than one node
    nodes = {n for ns in trained["tags.raysae.nodes"] for n in ns.split(",")}
    assert len(nodes) >= 2, nodes
    # the runs that were training on the lost node went on from their checkpoints on another one
    # (a run of the same node that had finished before the removal stays there)
    moved = trained.filter(pl.col("run_id").is_in(list(interrupted)))
    assert moved.height == len(interrupted) >= 1
    client = mlflow.tracking.MlflowClient()
    for run_id, ns in moved.select("run_id", "tags.raysae.nodes").iter_rows():
        history = [(m.value, round(m.timestamp / 1000 - removed_at, 2))
                   for m in client.get_metric_history(run_id, "tokens_seen")]
        assert removed in ns.split(",") and ns.split(",")[-1] != removed, (removed, ns, history)
    # no checkpoint lost or logged twice: each run's evaluations at 1024, 2048, 3072, 4096
    for run_id in trained["run_id"]:
        steps = [m.step for m in client.get_metric_history(run_id, "eval/ces")]
        assert sorted(set(steps)) == [1024, 2048, 3072, 4096], steps
