"""`ray job submit` end to end: a real head on 127.0.0.1, the train job, MLflow, the analysis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import TINY_NEOX, local_head, ray_alive

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head(tmp_path_factory, foreign_ray):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the job's own
    env |= {"PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token"}
    with local_head(None, "--num-cpus", "2", "--object-store-memory", "200000000", env=env) as h:
        yield env, h.dashboard


def test_stopping_our_head_leaves_another_ray_running(foreign_ray):
    """The suite's heads are started in sessions of their own and stopped by ending that
    session: a Ray the suite did not start (`foreign_ray`) keeps running."""
    with local_head(None, "--num-cpus", "1", env={**os.environ, "RAY_AUTH_MODE": "token"}) as ours:
        assert ray_alive(ours.dashboard) and ray_alive(foreign_ray)
    assert not ray_alive(ours.dashboard)
    assert ray_alive(foreign_ray)


def test_submit_train_job_and_analyse(head, tmp_path, token_file):
    env, address = head
    config = {
        "name": "submit-test",
        "model": {"name": "tiny-neox", "from_config": TINY_NEOX},
        "data": {"source": str(token_file), "context_length": 16, "num_tokens": 1024},
        "cache": {"layers": [0, 2], "shard_tokens": 256},
        "sae": {"architecture": "topk", "expansion_factor": 2, "k": 8},
        "train": {"num_tokens": 4096, "batch_size": 512, "lr": 3e-3, "checkpoint_every_tokens": 2048, "data_passes": 5,
                  "eval_tokens": 128, "log_every_steps": 2},
    }
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    runs = tmp_path / "runs"
    out = subprocess.run(
        [BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
         "python", "jobs/demo.py", str(cfg_path), "--runs-dir", str(runs)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in out.stdout
    # the job wrote to the runs dir we named, not into Ray's copy of the working dir
    assert (runs / "mlflow.db").is_file()
    table = pl.read_csv(runs / "analysis" / "submit-test" / "layers.csv")
    assert table["layer"].to_list() == [0, 2]
    assert (table["tokens"] == 4096).all()
    assert (table["L0"] <= 8 + 1e-9).all()  # topk keeps at most k latents
    assert table["explained variance"].is_between(-1.0, 1.0).all()
    saes = sorted(p.name for p in (runs / "saes").iterdir())
    assert len(saes) == 2 and all((runs / "saes" / s / "cfg.json").is_file() for s in saes)
