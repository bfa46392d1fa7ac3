"""Sweep utilisation: the share of a sweep's wall-clock x workers spent inside LM forwards and
SAE steps, and where the rest goes, read from the MLflow runs of a finished sweep.

Every SAE group's rank 0 logs its clock on its members' runs (`time/stream_s`: reading shards
or running the forward; `time/train_s`: the SAE steps; `time/eval_s`, `time/commit_s`:
checkpoints; `time/worker_s`: the worker's whole life). With W workers per group and C groups
the cluster runs at once, utilisation = sum over groups of W x (stream + train) / (sweep wall
x C x W). The rest is split into the groups' checkpoints, their Ray start-up (a group's wall
time in Tune beyond its worker's life), and what no group covers (caching, the zero-shot and
feature phases, idle slots).

    python benchmarks/bench_sweep_utilisation.py --runs-dir runs EXPERIMENT [--concurrent 2]
    python benchmarks/bench_sweep_utilisation.py --medium   # builds and runs the medium sweep

`--medium` runs a sweep sized so that each training group runs for minutes on 2 cores: the
Pythia-160M shape (random weights) on 4 layers, ReLU SAEs of expansion 2, streamed, on a local
Ray, then reports it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent


def report(runs_dir: Path, experiment: str, concurrent: int) -> dict:
    client = MlflowClient(f"sqlite:///{runs_dir.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if r.data.tags.get("raysae.phase") == "sweep"]
    parent = max(parents, key=lambda r: r.info.start_time)
    wall = (parent.info.end_time - parent.info.start_time) / 1000
    workers = int(parent.data.params.get("train.num_workers", "1"))
    groups: dict[str, dict[str, float]] = {}
    for r in runs:
        group = r.data.tags.get("raysae.group")
        if group is None:
            continue
        clock = {k.removeprefix("time/").removesuffix("_s"): v
                 for k, v in r.data.metrics.items() if k.startswith("time/")}
        if clock and clock.get("worker", 0) >= groups.get(group, {}).get("worker", -1):
            groups[group] = clock  # the member that finished last saw the group's whole life
    busy = sum(g.get("stream", 0) + g.get("train", 0) for g in groups.values())
    checkpoints = sum(g.get("eval", 0) + g.get("commit", 0) for g in groups.values())
    lives = sum(g.get("worker", 0) for g in groups.values())
    capacity = wall * concurrent
    out = {
        "experiment": experiment,
        "source": parent.data.tags.get("raysae.source"),
        "wall_s": wall,
        "groups": len(groups),
        "workers_per_group": workers,
        "concurrent_groups": concurrent,
        "utilisation": busy / capacity,
        "forward_or_read_share": sum(g.get("stream", 0) for g in groups.values()) / capacity,
        "sae_step_share": sum(g.get("train", 0) for g in groups.values()) / capacity,
        "checkpoint_share": checkpoints / capacity,
        "worker_other_share": (lives - busy - checkpoints) / capacity,
        "outside_groups_share": 1 - lives / capacity,
    }
    return out


def medium(tokens: int) -> tuple[Path, str]:
    tmp = Path(tempfile.mkdtemp(prefix="raysae-medium-"))
    hf = json.loads((ROOT / "raysae/model_configs/EleutherAI__pythia-160m-deduped.json").read_text())
    hf["num_hidden_layers"] = 4
    rows = np.random.default_rng(0).integers(3, 50000, size=(2 * tokens // 128 + 64, 128))
    pq.write_table(pa.table({"input_ids": pa.array(list(rows.astype(np.int32)))}), tmp / "tokens.parquet")
    cfg = {
        "name": "medium-sweep",
        "model": {"name": "pythia-160m-shape-4l", "from_config": hf},
        "data": {"source": str(tmp / "tokens.parquet"), "context_length": 128,
                 "num_tokens": tokens},
        "cache": {"layers": [0, 1, 2, 3], "batch_size": 16, "shard_tokens": 16384},
        "sae": {"architecture": "relu", "expansion_factor": 2, "l1_coefficient": 1.0},
        "train": {"num_tokens": tokens, "batch_size": 1024, "lr": 3e-4,
                  "checkpoint_every_tokens": tokens // 2, "eval_tokens": 2048,
                  "log_every_steps": 50, "source": "streamed"},
        "sweep": {"layers": [0, 1, 2, 3], "finetune_budgets": [tokens // 2], "finetune_lr": 1e-4,
                  "compute_plan": False},
    }
    (tmp / "medium.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "local"}
    subprocess.run([sys.executable, "-m", "raysae.cli", "sweep", str(tmp / "medium.yaml"),
                    "--runs-dir", str(tmp / "runs")], check=True, env=env)
    return tmp / "runs", "medium-sweep"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", nargs="?")
    p.add_argument("--runs-dir", default="runs", type=Path)
    p.add_argument("--concurrent", type=int, default=1,
                   help="groups the cluster ran at once (this machine: 1 streamed group "
                        "holds both cores)")
    p.add_argument("--medium", action="store_true")
    p.add_argument("--tokens", type=int, default=524_288, help="--medium: scratch budget")
    args = p.parse_args()
    if args.medium:
        args.runs_dir, args.experiment = medium(args.tokens)
    print(json.dumps(report(args.runs_dir, args.experiment, args.concurrent), indent=1))


if __name__ == "__main__":
    main()
