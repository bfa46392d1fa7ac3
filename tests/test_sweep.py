"""The layer-transfer sweep through Ray Tune: killed mid-run, re-submitted, finished exactly once."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY_NEOX, driver_env, kill_when, ray_alive
from mlflow.tracking import MlflowClient

from raysae.activations import fingerprint
from raysae.config import load_config
from raysae.transfer import grid

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {
    "name": "sweep-test",
    "model": {"name": "tiny-neox", "from_config": TINY_NEOX},
    "data": {"context_length": 16, "num_tokens": 1024},
    "cache": {"layers": [0, 1], "shard_tokens": 256},
    "sae": {"architecture": "topk", "expansion_factor": 2, "k": 8},
    "train": {"num_tokens": 2048, "batch_size": 256, "lr": 1e-3, "checkpoint_every_tokens": 1024,
              "eval_tokens": 128, "log_every_steps": 2, "data_passes": 3},
    "sweep": {"layers": [0, 1], "finetune_budgets": [2048], "finetune_lr": 1e-3,
              "compute_plan": False},
}


def sweep_cmd(cfg_path: Path, runs: Path) -> list[str]:
    return [sys.executable, "-m", "raysae.cli", "sweep", str(cfg_path), "--runs-dir", str(runs)]


def runs_table(runs: Path) -> pl.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
    df = mlflow.search_runs(experiment_names=["sweep-test"])
    return pl.from_pandas(df.astype({c: str for c in df.columns if c.startswith("tags.")}))


def write_task_file(path: Path, n: int = 8) -> Path:
    """Token-id contrastive tasks for the tiny model: two tasks, counterfactuals one token off."""
    rng = np.random.default_rng(1)
    rows = []
    for task in ("copy", "swap"):
        for _ in range(n):
            prompt = [0, *rng.integers(3, 128, size=int(rng.integers(5, 10))).tolist()]
            counter = list(prompt)
            counter[1] = int((counter[1] + 5) % 125 + 3)
            correct, wrong = rng.choice(np.arange(3, 128), 2, replace=False).tolist()
            rows.append({"task": task, "prompt_ids": prompt, "counter_ids": counter,
                         "correct_id": correct, "wrong_id": wrong})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory, token_file, foreign_ray):
    tmp = tmp_path_factory.mktemp("sweep")
    cfg_path = tmp / "sweep.yaml"
    tasks = write_task_file(tmp / "tasks.parquet")
    # min_feature_effect 0: every ratio defined, whatever the random model does with the tasks
    features = {"tasks": [str(tasks)], "examples_per_task": 6, "faithfulness_n": [0.05, 16],
                "completeness_n": [0.05, 16],
                "min_feature_effect": 0.0,
                "exact_check_features": 4, "dashboard_features": 6, "dashboard_contexts": 3}
    cfg_path.write_text(yaml.safe_dump({**CONFIG, "data": {**CONFIG["data"], "source": str(token_file)},
                                        "features": features}))
    runs = tmp / "runs"
    env = driver_env()

    # 1. start the sweep and kill its whole process group (driver and local Ray) once the
    #    transfer phase is under way: the scratch phase is complete, a transfer trial is running
    killed, code = kill_when(sweep_cmd(cfg_path, runs), env, settle_s=8, timeout_s=400,
                             ready=lambda: any((runs / "tune").glob("sweep-test-*-transfer/*/")))
    assert killed, f"the sweep ended (exit {code}) before it could be interrupted"
    before = runs_table(runs)

    # 2. re-submit: only what is missing runs
    second = subprocess.run(sweep_cmd(cfg_path, runs), env=env, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # the kill took the driver's own Ray only: a Ray it did not start runs on
    assert ray_alive(foreign_ray)
    return load_config(cfg_path), runs, before, second.stdout


def test_grid_counts_and_mlflow_layout(swept):
    cfg, runs, _, stdout = swept
    assert "sweep sweep-test: 8 trials finished, 0 not" in stdout
    df = runs_table(runs)
    parent = df.filter(pl.col("tags.raysae.phase") == "sweep")
    assert parent.height == 1 and parent["status"][0] == "FINISHED"
    children = df.filter(pl.col("tags.raysae.phase") != "sweep")
    assert (children["tags.mlflow.parentRunId"] == parent["run_id"][0]).all()
    counts = dict(children.group_by("tags.raysae.phase").len().iter_rows())
    assert counts == {"scratch": 2, "zeroshot": 4, "transfer": 2}
    # one run per trial key, all finished, named and tagged per grid axis
    keys = {t.key for t in grid.expand(cfg, cfg.sweep, grid.base_digest(cfg, fingerprint(cfg)))}
    assert set(children["tags.raysae.run_key"]) == keys
    assert (children["status"] == "FINISHED").all()
    assert set(children["tags.mlflow.runName"]) >= {"L0 scratch", "L1←L0 fwd", "L0←L1 bwd"}
    fwd = children.filter(pl.col("tags.raysae.direction") == "fwd", pl.col("tags.raysae.phase") == "transfer")
    assert fwd["tags.raysae.layer"][0] == "1" and fwd["tags.raysae.source_layer"][0] == "0"
    assert fwd["tags.raysae.budget"][0] == "2048"
    # the zero-shot diagonal is the scratch SAE on its own layer: the same CES
    for layer in ("0", "1"):
        diag = children.filter(pl.col("tags.raysae.phase") == "zeroshot",
                               pl.col("tags.raysae.layer") == layer,
                               pl.col("tags.raysae.source_layer") == layer)
        scratch = children.filter(pl.col("tags.raysae.phase") == "scratch",
                                  pl.col("tags.raysae.layer") == layer)
        assert diag["metrics.eval/ces"][0] == pytest.approx(scratch["metrics.eval/ces"][0], abs=1e-9)
    # the zero-shot matrix was read out by the scratch group at its final checkpoint (no
    # separate pass over the held-out tokens)
    zs = children.filter(pl.col("tags.raysae.phase") == "zeroshot")
    groups = set(children.filter(pl.col("tags.raysae.phase") == "scratch")["tags.raysae.group"])
    assert "nan" not in groups and set(zs["tags.raysae.group"]) <= groups
    # derived metrics on every transfer run
    transfer = children.filter(pl.col("tags.raysae.phase") == "transfer")
    for col in ("metrics.normalized_ces", "metrics.mmcs_vs_scratch", "metrics.flops",
                "metrics.transfer_score/top_logits", "metrics.transfer_score/max_activating",
                "metrics.transfer_score/combined"):
        assert transfer[col].is_not_null().all(), col
    assert transfer["metrics.mmcs_vs_scratch"].is_between(-1, 1).all()


def test_feature_phase_on_every_trained_sae(swept):
    """Circuits at every checkpoint of every trained SAE, logged once; dashboards as artifacts,
    and the comparison view on each scratch SAE beside the SAE transferred from it."""
    cfg, runs, _, _ = swept
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    trained = runs_table(runs).filter(pl.col("tags.raysae.phase").is_in(["scratch", "transfer"]))
    assert trained.height == 4
    d_sae = 2 * TINY_NEOX["hidden_size"]  # [0.05, 16] -> 6 and 16 features
    for run_id, phase in trained.select("run_id", "tags.raysae.phase").iter_rows():
        run = client.get_run(run_id)
        assert run.data.tags["raysae.features"] == "done"
        for task in ("copy", "swap", "mean"):
            for kind in ("faithfulness", "completeness"):
                for n in (round(0.05 * d_sae), 16):
                    hist = client.get_metric_history(run_id, f"circuit/{task}/{kind}/n{n}")
                    assert sorted(m.step for m in hist) == [1024, 2048], (task, kind, n)
                    assert all(np.isfinite(m.value) for m in hist)
        corr = client.get_metric_history(run_id, "circuit/copy/atp_exact_corr")
        assert all(-1 <= m.value <= 1 for m in corr) and len(corr) == 2
        for task in ("copy", "swap"):  # the model's own m does not depend on the SAE
            m_model = client.get_metric_history(run_id, f"circuit/{task}/m_model")
            assert m_model[0].value == pytest.approx(m_model[1].value, abs=1e-4)
        assert len(client.get_metric_history(run_id, "dla/mean/total")) == 2
        table = pl.read_parquet(client.download_artifacts(run_id, "circuits/features.parquet"))
        for task in ("copy", "swap"):  # each of the 6 examples has 6 features in its circuit
            assert table.filter(pl.col("task") == task)["in_circuit"].sum() == pytest.approx(6)
        names = {a.path for a in client.list_artifacts(run_id, "dashboard")}
        assert "dashboard/index.html" in names and "dashboard/features" in names
        pages = client.list_artifacts(run_id, "dashboard/features")
        assert len(pages) == 6
        compare = {a.path for a in client.list_artifacts(run_id, "dashboard_compare")}
        assert ("dashboard_compare/index.html" in compare) == (phase == "scratch")
    # the comparison page of a feature shows the scratch SAE and the SAE transferred from it
    scratch0 = trained.filter(pl.col("tags.mlflow.runName") == "L0 scratch")["run_id"][0]
    local = Path(client.download_artifacts(scratch0, "dashboard_compare"))
    page = next((local / "compare").glob("*.html")).read_text()
    assert "L0 scratch" in page and "L1←L0 fwd" in page


def test_resubmission_ran_only_what_was_missing(swept):
    cfg, runs, before, _ = swept
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    df = runs_table(runs)
    scratch_before = before.filter(pl.col("tags.raysae.phase") == "scratch")
    assert (scratch_before["status"] == "FINISHED").all() and scratch_before.height == 2
    for run_id in df.filter(pl.col("tags.raysae.phase").is_in(["scratch", "transfer"]))["run_id"]:
        steps = [m.step for m in client.get_metric_history(run_id, "eval/ces")]
        if run_id in set(scratch_before["run_id"]):
            assert steps == [1024, 2048]  # finished before the kill: not trained again
        assert sorted(set(steps)) == [1024, 2048]
        tokens = client.get_run(run_id).data.tags["raysae.tokens_seen"]
        assert tokens == "2048"  # exactly the budget, interrupted or not


def test_third_submission_is_a_no_op(swept):
    _, runs, _, _ = swept
    n_before = runs_table(runs).height
    cfg_path = next(runs.parent.glob("sweep.yaml"))
    env = driver_env()
    out = subprocess.run(sweep_cmd(cfg_path, runs), env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "8 trials finished, 0 not" in out.stdout
    # settled on the driver from MLflow: no feature task started
    assert "features: 4 SAEs evaluated under these settings already, 0 to evaluate" in out.stderr
    assert runs_table(runs).height == n_before
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    for run_id in runs_table(runs).filter(pl.col("tags.raysae.phase") == "scratch")["run_id"]:
        steps = [m.step for m in client.get_metric_history(run_id, "circuit/mean/m_model")]
        assert steps == [1024, 2048]  # the feature phase did not run again


def test_changed_feature_settings_rerun_only_the_feature_phase(swept):
    _, runs, _, _ = swept
    cfg_path = next(runs.parent.glob("sweep.yaml"))
    data = yaml.safe_load(cfg_path.read_text())
    data["features"]["faithfulness_n"] = data["features"]["completeness_n"] = [0.05, 16, 32]
    changed = cfg_path.with_name("sweep-more-n.yaml")
    changed.write_text(yaml.safe_dump(data))
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    trained = runs_table(runs).filter(pl.col("tags.raysae.phase").is_in(["scratch", "transfer"]))
    ces_before = {r: client.get_metric_history(r, "eval/ces") for r in trained["run_id"]}
    out = subprocess.run(sweep_cmd(changed, runs), env=driver_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "8 trials finished, 0 not" in out.stdout
    for run_id in trained["run_id"]:
        hist = client.get_metric_history(run_id, "circuit/mean/faithfulness/n32")
        assert sorted(m.step for m in hist) == [1024, 2048]  # every checkpoint again
        assert client.get_metric_history(run_id, "eval/ces") == ces_before[run_id]  # no training


def test_analysis_regenerates_tables_and_figures(swept):
    _, runs, _, _ = swept
    script = ROOT / "analysis" / "sweep_report.py"
    out = subprocess.run([sys.executable, str(script), "sweep-test", "--runs-dir", str(runs)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    d = runs / "analysis" / "sweep-test"
    matrix = pl.read_csv(d / "zeroshot_ces.csv")
    assert matrix.columns == ["eval layer i", "SAE_0", "SAE_1"] and matrix.height == 2
    assert matrix.null_count().sum_horizontal()[0] == 0
    for name in ("normalized_ces_fwd", "normalized_ces_bwd"):
        table = pl.read_csv(d / f"{name}.csv")
        # the paper's Tables 3-4 value at its final checkpoint beside (another setting)
        assert table.columns == ["layer", "2048 @1024", "2048 @2048", "paper @500M"]
    assert pl.read_csv(d / "normalized_ces_fwd.csv")["layer"].to_list() == [1]
    for png in ("zeroshot_ces.png", "curves.png"):
        assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    compute = (d / "compute.md").read_text()
    # both plans at 50% of 2048 tokens: the 1024-token checkpoints of the transfers
    assert "tokens saved by the forward plan: 25.0%" in compute and "FLOPs saved" in compute
    assert "tokens saved by the backward plan: 25.0%" in compute and "(checkpoint)" in compute
    paper = pl.read_csv(d / "paper.csv")
    assert set(paper["same setting"]) == {"no"} and paper["paper"].is_not_null().all()
    # feature-quality figures: per direction and checkpoint, per N, per task, DLA per layer
    by_ckpt = pl.read_csv(d / "circuits_by_checkpoint.csv")
    assert set(by_ckpt.columns) == {"direction", "budget", "tokens", "faithfulness",
                                    "completeness", "cells", "undefined", "common cells",
                                    "faithfulness common", "completeness common", "dla_mean",
                                    "dla_total"}
    assert (by_ckpt["undefined"] == 0).all()  # min_feature_effect 0: every ratio defined
    assert set(by_ckpt["direction"]) == {"scratch", "fwd", "bwd"}
    assert sorted(set(by_ckpt["tokens"])) == [1024, 2048]
    by_n = pl.read_csv(d / "circuits_by_n.csv")
    sizes = [6, 16, 32]  # the last submission added N=32
    assert by_n.columns == ["direction", *[c for k in ("faithfulness", "completeness")
                                           for c in (*[f"{k} N={n}" for n in sizes], k)],
                            "cells", "undefined"]
    assert pl.read_csv(d / "circuits_by_direction.csv")["direction"].to_list() == [
        "bwd", "fwd", "scratch"]
    by_task = pl.read_csv(d / "circuits_by_task.csv")
    assert set(by_task["task"]) == {"copy", "swap"} and "atp_exact_corr" in by_task.columns
    assert pl.read_csv(d / "dla_by_layer.csv")["layer"].to_list() == [0, 1]
    assert (d / "circuits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the figures are also artifacts of one summary run
    df = runs_table(runs)
    summary = df.filter(pl.col("tags.raysae.phase") == "summary")
    assert summary.height == 1
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    names = {a.path for a in client.list_artifacts(summary["run_id"][0], "analysis")}
    assert "analysis/zeroshot_ces.png" in names and "analysis/normalized_ces_fwd.md" in names


def test_failed_trial_is_reported_and_only_its_dependents_skipped(swept, tmp_path, token_file):
    cfg = {**CONFIG, "name": "sweep-fail", "data": {**CONFIG["data"], "source": str(token_file)},
           "sweep": {**CONFIG["sweep"], "max_failures": 0}}
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    runs = tmp_path / "runs"
    env = driver_env()
    # the same model, data and cache settings: a copy of the first sweep's activation cache
    swept_cfg, swept_runs, _, _ = swept
    assert fingerprint(load_config(cfg_path)) == fingerprint(swept_cfg)
    shutil.copytree(swept_runs / "activations", runs / "activations")
    # corrupt one shard of layer 1 (same size: only its checksum can tell)
    shard = sorted(runs.glob("activations/*/blocks.1.hook_resid_post/shard-*.arrow"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    out = subprocess.run(sweep_cmd(cfg_path, runs), env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "3 trials finished, 5 not" in out.stdout  # L0 scratch, zero-shot of SAE_0 on 0 and 1
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("  ")]
    failed = [ln for ln in lines if "failed:" in ln]
    skipped = [ln for ln in lines if "skipped: depends on" in ln]
    assert any("L1:" in ln and "is corrupted" in ln for ln in failed)  # SAE_1 failed, and why
    assert any("L1<L0" in ln for ln in failed)  # ...and so did training on layer 1 from SAE_0
    assert len(skipped) == 3  # SAE_1 on layers 0 and 1, and L0<-L1, never started
    df = runs_table_named(runs, "sweep-fail")
    assert df.filter(pl.col("tags.raysae.phase") == "sweep")["status"][0] == "FAILED"
    ok = df.filter(pl.col("tags.raysae.run_key").str.contains(":L0:"))
    assert ok["status"].to_list() == ["FINISHED"]


def runs_table_named(runs: Path, name: str) -> pl.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
    df = mlflow.search_runs(experiment_names=[name])
    return pl.from_pandas(df.astype({c: str for c in df.columns if c.startswith("tags.")}))
