"""A tiny stitch sweep on the toy pair, end to end on local Ray: killed mid-run, re-submitted,
finished exactly once; then the analysis reads it back from MLflow."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import polars as pl
import pytest
import torch
import yaml
from conftest import driver_env, kill_when

from raysae.config import load_config
from raysae.distributed.stitching import stitch_dir_for
from raysae.distributed.training import sae_dir_for
from raysae.sae import SAE
from raysae.stitching.stitch import Stitch, lstsq_flops, transfer_sae

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent


def config(toy) -> dict:
    return {
        "name": "stitch-test",
        "model": {"name": str(toy.small)},
        "data": {"source": str(toy.corpus), "context_length": 64, "num_tokens": 16384},
        "cache": {"batch_size": 32, "shard_tokens": 4096},
        "sae": {"architecture": "topk", "k": 8},
        "train": {"num_tokens": 8192, "batch_size": 512, "lr": 3e-3, "checkpoint_every_tokens": 4096,
                  "eval_tokens": 1024, "log_every_steps": 2},
        "stitch": {
            "large": {"name": str(toy.large)},
            "match_layers": [1],
            "num_tokens": 8192, "batch_size": 512, "lr": 1e-3, "checkpoint_every_tokens": 4096,
            "lstsq_tokens": 4096, "match_tokens": 2048,
            "widths": [64], "budgets": [4096, 8192],
            "stop_at_thresholds": True, "check_every_tokens": 2048,
            "probes": {"source": str(toy.heldout), "labels": ["topic", "number"], "num_rows": 64,
                       "sparse_k": [1, 4], "steering_tokens": 4},
            "variants": str(toy.variants),
        },
        "features": {"tasks": [str(toy.tasks)], "examples_per_task": 8,
                     "faithfulness_n": [4, 16], "completeness_n": [4, 16],
                     "exact_check_features": 4, "checkpoints": "final", "dashboard_features": 4,
                     "dashboard_contexts": 3},
    }


def runs_table(runs: Path) -> pl.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
    df = mlflow.search_runs(experiment_names=["stitch-test"])
    return pl.from_pandas(df.astype({c: str for c in df.columns if c.startswith("tags.")}))


@pytest.fixture(scope="module")
def swept(tmp_path_factory, toy_pair):
    tmp = tmp_path_factory.mktemp("stitch")
    cfg_path = tmp / "stitch.yaml"
    cfg_path.write_text(yaml.safe_dump(config(toy_pair)))
    runs = tmp / "runs"
    cmd = [sys.executable, "-m", "raysae.cli", "stitch", str(cfg_path), "--runs-dir", str(runs)]
    # 1. kill driver and local Ray once B's stitched-init SAEs are training (the transfer phase)
    killed, _ = kill_when(cmd, driver_env(), settle_s=5, timeout_s=500,
                          ready=lambda: any((runs / "tune").glob("stitch-test-*-stitch-transfer/*/")))
    # 2. re-submit: only what is missing runs
    second = subprocess.run(cmd, env=driver_env(), capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {"runs": runs, "cfg": cfg_path, "killed": killed, "stdout": second.stdout}


def test_every_trial_finished_exactly_once(swept):
    assert swept["killed"], "the first submission finished before it could be interrupted"
    df = runs_table(swept["runs"])
    counts = df.group_by("tags.raysae.role").len()
    got = dict(zip(counts["tags.raysae.role"], counts["len"]))
    assert got == {"stitch_sweep": 1, "stitch": 1, "scratch_a": 1, "scratch_b": 2, "zeroshot": 1,
                   "transfer": 2, "probes": 1}
    assert set(df["status"]) == {"FINISHED"}
    assert df["tags.raysae.run_key"].n_unique() == len(df)
    # one-worker groups ran in their Tune trials: their commits are the trials' checkpoints (the
    # killed transfer trial resumed from one), and no Ray Train run was started
    runs = swept["runs"]
    assert not (runs / "ray_train").exists()
    for phase in ("fit", "transfer"):
        commits = list((runs / "tune").glob(f"stitch-test-*-stitch-{phase}/*/checkpoint_*/group.json"))
        assert commits, phase


def test_b_saes_stop_at_the_largest_threshold(swept):
    """`stitch.stop_at_thresholds`: each of B's SAEs (scratch and stitched) ends at the first
    check (every 2,048 tokens) whose held-out EV reaches the largest threshold, or runs its
    budget below it; its run says which. A's SAE has no rule."""
    from raysae.distributed.engine import STOP_TAG

    df = runs_table(swept["runs"])
    client = mlflow.tracking.MlflowClient(f"sqlite:///{swept['runs'] / 'mlflow.db'}")
    top = max(load_config(swept["cfg"]).stitch.ev_thresholds)
    for row in df.filter(pl.col("tags.raysae.role").is_in(["scratch_b", "transfer"])).iter_rows(named=True):
        tokens, why = int(row["tags.raysae.tokens_seen"]), row[f"tags.{STOP_TAG}"]
        ev = {m.step: m.value for m in client.get_metric_history(row["run_id"],
                                                                 "eval/explained_variance")}
        assert sorted(ev) == list(range(2048, tokens + 1, 2048))
        assert all(v < top for s, v in ev.items() if s < tokens)
        if why.startswith("target: eval/explained_variance"):
            assert ev[tokens] >= top
        else:
            assert why.startswith("budget:") and tokens == int(row["tags.raysae.budget"])
    a = df.filter(pl.col("tags.raysae.role") == "scratch_a")
    assert a[f"tags.{STOP_TAG}"].to_list() in ([None], ["None"], ["nan"])


def test_stitch_quality_and_layer_match(swept, toy_pair):
    df = runs_table(swept["runs"])
    stitch = df.filter(pl.col("tags.raysae.role") == "stitch").row(0, named=True)
    vocab = toy_pair.read_report()["vocab_size"]  # a uniform guess costs log(vocab)
    assert stitch["metrics.ce/a"] < math.log(vocab) / 2 and stitch["metrics.ce/b"] < math.log(vocab) / 2
    for name in ("a_to_b", "b_to_a", "a_round_trip", "b_round_trip"):
        assert stitch[f"metrics.ce/{name}"] < math.log(vocab) / 2, name  # far better than chance
    assert stitch["metrics.map/up_ev"] > 0.5 and stitch["metrics.map/down_ev"] > 0.5
    assert stitch["metrics.lstsq/map/up_ev"] > 0.5
    layer_b = int(stitch["tags.raysae.layer_b"])
    parent = df.filter(pl.col("tags.raysae.role") == "stitch_sweep").row(0, named=True)
    match = mlflow.artifacts.load_dict(f"{parent['artifact_uri']}/layer_match.json")
    row = match["matrix"][1]
    assert match["best"] == {"1": layer_b} and row[layer_b] == max(row)
    assert all(0 <= v <= 1 + 1e-6 for r in match["matrix"] for v in r)


def test_stitched_init_is_the_closed_form_transfer(swept):
    cfg = load_config(swept["cfg"])
    df = runs_table(swept["runs"])
    key = lambda role: df.filter(pl.col("tags.raysae.role") == role)["tags.raysae.run_key"][0]  # noqa: E731
    cfg = dataclasses.replace(cfg, runs_dir=str(swept["runs"]))
    stitch = Stitch.load(stitch_dir_for(cfg, key("stitch")))
    sae_a = SAE.load(sae_dir_for(cfg, key("scratch_a")))
    init = SAE.load(sae_dir_for(cfg, key("zeroshot")))
    expected = transfer_sae(sae_a, stitch)
    x = torch.randn(16, stitch.d_b)
    assert torch.allclose(init.encode(x), expected.encode(x), atol=1e-5)
    assert init.metadata.model_name == cfg.stitch.large.name
    # the stitch's FLOPs, its least-squares start included, are charged to every stitched-init
    # run; a stitch is dense, so both accountings agree
    row = df.filter(pl.col("tags.raysae.role") == "stitch").row(0, named=True)
    stitch_flops, lstsq = row["metrics.flops"], row["metrics.lstsq/flops"]
    assert lstsq == pytest.approx(lstsq_flops(cfg.stitch.lstsq_tokens, stitch.d_a, stitch.d_b))
    assert stitch_flops == pytest.approx(20 * stitch.d_a * stitch.d_b * cfg.stitch.num_tokens + lstsq)
    assert row["metrics.flops_dense_equiv"] == stitch_flops
    transfer = df.filter(pl.col("tags.raysae.role") == "transfer")
    assert transfer["metrics.stitch_flops"].to_list() == [stitch_flops] * 2
    assert transfer["metrics.stitch_flops_dense_equiv"].to_list() == [stitch_flops] * 2
    # B's SAEs: as run (sparse TopK) well under the dense count, 10 d_B d_sae per token
    dense = 10.0 * stitch.d_b * 64 * transfer["metrics.tokens_seen"]
    assert transfer["metrics.flops_dense_equiv"].to_list() == pytest.approx(dense.to_list())
    assert (transfer["metrics.flops"] < transfer["metrics.flops_dense_equiv"]).all()


def test_probes_and_feature_classes_logged(swept):
    df = runs_table(swept["runs"])
    probes = df.filter(pl.col("tags.raysae.role") == "probes").row(0, named=True)
    for label in ("topic", "number"):
        for kind in ("a_on_a", "a_on_b", "b_on_b", "random", "majority"):
            assert 0 <= probes[f"metrics.probe/{label}/{kind}"] <= 1
        assert probes[f"metrics.probe/{label}/a_on_a"] > probes[f"metrics.probe/{label}/majority"]
    assert 0 <= probes["metrics.steering/a_mapped/success"] <= 1
    n = probes["metrics.features/w64/structural/count"] + probes["metrics.features/w64/semantic/count"]
    assert 0 < n <= 64


def test_feature_phase_covers_every_sae_of_both_models(swept):
    """Circuits of A's SAE on A and of its twins on B, from the toy tasks; A's dashboard
    comparison shows the zero-shot and the stitched-init SAE of B beside it."""
    df = runs_table(swept["runs"])
    client = mlflow.tracking.MlflowClient(f"sqlite:///{swept['runs'] / 'mlflow.db'}")
    saes = df.filter(pl.col("tags.raysae.role").is_in(["scratch_a", "scratch_b", "zeroshot",
                                                        "transfer"]))
    assert saes.height == 6 and (saes["tags.raysae.features"] == "done").all()
    for task in ("sva", "ioi", "greater_than", "induction", "brackets"):
        m_model = saes[f"metrics.circuit/{task}/m_model"]
        effect = (m_model - saes[f"metrics.circuit/{task}/m_empty"]).abs()
        defined = effect > 0.25 * m_model.abs()  # the default features.min_feature_effect
        for n in (4, 16):
            for kind in ("faithfulness", "completeness"):
                col = saes[f"metrics.circuit/{task}/{kind}/n{n}"].fill_null(math.nan)  # NaN
                assert (col.is_finite() == defined).to_list() == [True] * 6, (task, kind, n)
        # the toy models solve every task: m of the model is clearly positive on A and on B
        assert (m_model > 0.5).all(), task
    assert saes["metrics.circuit/mean/faithfulness/n16"].is_finite().all()
    # B's SAEs all see the same model B: the same m(M) whichever SAE is spliced
    on_b = saes.filter(pl.col("tags.raysae.role") != "scratch_a")["metrics.circuit/sva/m_model"]
    assert on_b.max() - on_b.min() < 1e-3
    a_run = saes.filter(pl.col("tags.raysae.role") == "scratch_a")["run_id"][0]
    local = Path(client.download_artifacts(a_run, "dashboard_compare"))
    page = next((local / "compare").glob("*.html")).read_text()
    assert "zero-shot" in page and "stitched init" in page
    zs = saes.filter(pl.col("tags.raysae.role") == "zeroshot")["run_id"][0]
    assert "dashboard/index.html" in {a.path for a in client.list_artifacts(zs, "dashboard")}


def test_analysis_reads_the_sweep(swept, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "analysis" / "stitch_report.py"), "stitch-test",
         "--runs-dir", str(swept["runs"]), "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    d = tmp_path / "stitch-test"
    for name in ("stitch_ce.csv", "sae_transfer.csv", "flops_to_threshold.csv", "scaling_fit.csv",
                 "scaling_fit_model.csv", "paper.csv", "probes.csv", "feature_classes.csv", "layer_match.png", "curves.png",
                 "circuits.csv"):
        assert (d / name).is_file(), name
    circ = pl.read_csv(d / "circuits.csv")
    assert circ["SAE"].to_list() == ["A", "B zero-shot", "B stitched init", "B stitched init",
                                     "B scratch", "B scratch"]
    assert circ["faithfulness"].is_finite().all() and circ["AtP vs exact r"].is_between(-1, 1).all()
    table = pl.read_csv(d / "stitch_ce.csv")
    assert len(table) == 1
