"""analysis/sweep_report.py on a fabricated sqlite MLflow store of a two-layer sweep: the paper's
values beside the normalized CES where the sweep's checkpoint is the paper's (and only its final
value otherwise), the paper table, the compute summary of both plans with each plan transfer
read at a fine-tuning's checkpoint, and the combined transfer score."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import mlflow_store
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
import sweep_report  # noqa: E402

M = 1_000_000
BATCH = 4096
PAPER = {"model.name": "EleutherAI/pythia-160m-deduped", "sweep.site": "resid_post",
         "sae.expansion_factor": "8", "sae.d_sae": "None"}


def ckpt(c: int, batch: int = BATCH) -> int:
    """Where the loop checkpoints c tokens: the first batch at or after it."""
    return -(-c // batch) * batch


def nces(direction: str, step: int) -> float:
    return (0.5 if direction == "fwd" else 0.6) + step / (1000 * M)


def log_run(client: MlflowClient, exp: str, name: str, phase: str, layer: int,
            source: int | None, direction: str, budget: int, key: str,
            metrics: dict[str, list[tuple[int, float]]], tags: dict[str, str] | None = None,
            params: dict[str, str] | None = None) -> str:
    """A finished trial run tagged as the sweep tags it, with metric histories (step, value)."""
    tags = {"raysae.phase": phase, "raysae.layer": str(layer), "raysae.direction": direction,
            "raysae.source_layer": "" if source is None else str(source),
            "raysae.budget": str(budget), "raysae.run_key": key, **(tags or {})}
    run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
    client.log_batch(run_id, metrics=[Metric(k, v, 1, step) for k, hist in metrics.items()
                                      for step, v in hist],
                     params=[Param(k, v) for k, v in (params or {}).items()])
    client.set_terminated(run_id)
    return run_id


def log_parent(client: MlflowClient, root: Path, name: str, params: dict[str, str],
               summary: dict) -> str:
    """Experiment `name` with its sweep parent run: the sweep's params and its summary artifact."""
    exp = client.create_experiment(name, (root / "art" / name).as_uri())
    parent = client.create_run(exp, run_name="rep sweep", tags={"raysae.phase": "sweep"}).info.run_id
    client.log_batch(parent, params=[Param(k, v) for k, v in params.items()])
    (root / name).mkdir()
    (root / name / "sweep_summary.json").write_text(json.dumps(summary))
    client.log_artifact(parent, str(root / name / "sweep_summary.json"))
    client.set_terminated(parent)
    return exp


def fabricate(client: MlflowClient, root: Path, name: str, model: str, budget: int,
              scratch: int, every: int, batch: int = BATCH) -> None:
    params = {**PAPER, "model.name": model, "sweep.finetune_budgets": json.dumps([budget]),
              "sweep.layers": "[0, 1]"}
    P = scratch // 10
    summary = {"scratch_everywhere_tokens": 2 * scratch, "compute_plan_budget": P,
               "plan_budget_fraction": 0.1, "plan_from": "checkpoint", "plans": [
                   {"direction": d, "scratch_layers": [s], "transfers": [[t, s]],
                    "tokens": scratch + P, "saved_fraction": 1 - (scratch + P) / (2 * scratch),
                    "members": [{"key": f"s{s}", "layer": s, "tokens": scratch, "from": "scratch"},
                                {"key": f"t{t}", "layer": t, "tokens": P, "from": "checkpoint"}]}
                   for d, s, t in (("forward", 0, 1), ("backward", 1, 0))]}
    exp = log_parent(client, root, name, params, summary)
    run = functools.partial(log_run, client, exp)

    scratch_steps = [ckpt(c, batch) for c in range(every, scratch + 1, every)]
    for layer in (0, 1):
        run(f"L{layer} scratch", "scratch", layer, None, "scratch", scratch, f"s{layer}", {
            "eval/ces": [(t, 0.9 + layer / 100) for t in scratch_steps],
            "eval/explained_variance": [(t, 0.8) for t in scratch_steps],
            "flops": [(t, 10.0 * t / scratch) for t in scratch_steps],
            "eval/l2": [(t, 1.0) for t in scratch_steps], "eval/l0": [(t, 5.0) for t in scratch_steps]})
        for source in (0, 1):
            run(f"L{layer}←L{source} zero-shot", "zeroshot", layer, source, "self", 0,
                f"z{layer}{source}", {"eval/ces": [(0, 0.5 + layer + source)]})
    steps = [ckpt(c, batch) for c in range(every, budget + 1, every)]
    for layer, source, direction in ((1, 0, "fwd"), (0, 1, "bwd")):
        run(f"L{layer}←L{source} {direction}", "transfer", layer, source, direction, budget,
            f"t{layer}", {
                "eval/ces": [(t, 0.7 + t / (10 * budget)) for t in steps],
                "eval/explained_variance": [(t, 0.6) for t in steps],
                "flops": [(t, 4.0 * t / budget) for t in steps],
                "normalized_ces": [(t, nces(direction, t)) for t in steps],
                "eval/l2": [(t, 1.0) for t in steps], "eval/l0": [(t, 5.0) for t in steps],
                "transfer_score/top_logits": [(budget, 0.3)],
                "transfer_score/bottom_logits": [(budget, 0.6)],
                "transfer_score/max_activating": [(budget, 0.9)]})


def report(root: Path, name: str) -> Path:
    """Run the report on experiment `name` of the store under `root`, the figures of curves
    left out (slow, and tested with the sweep). MLflow's set_tracking_uri exports
    MLFLOW_TRACKING_URI, which the report reads first: cleared before and restored after."""
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    curves, sweep_report.curves = sweep_report.curves, lambda *a: None
    try:
        assert sweep_report.main([name, "--runs-dir", str(root), "--no-log"]) == 0
    finally:
        sweep_report.curves = curves
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return root / "analysis" / name


@pytest.fixture(scope="module")
def store(tmp_path_factory, empty_mlflow_db) -> Path:
    """One store, two sweeps: the paper's setting on two layers, and a toy one."""
    root = tmp_path_factory.mktemp("report")
    client = mlflow_store(empty_mlflow_db, root)
    fabricate(client, root, "paper", PAPER["model.name"], 500 * M, 1000 * M, 100 * M)
    fabricate(client, root, "toy", "toy://default/small", 2048, 4096, 1024, batch=256)
    return root


@pytest.fixture(scope="module")
def paper_sweep(store: Path) -> Path:
    return report(store, "paper")


def test_paper_values_beside_the_papers_checkpoints(paper_sweep: Path) -> None:
    fwd = pl.read_csv(paper_sweep / "normalized_ces_fwd.csv")
    expect = ["layer"]
    for c in range(100, 501, 100):
        expect += [f"{500 * M} @{ckpt(c * M)}", f"paper @{c}M"]
    assert fwd.columns == expect
    row = fwd.row(0, named=True)
    assert row["layer"] == 1 and row["paper @100M"] == 0.962 and row["paper @500M"] == 0.972
    assert row[f"{500 * M} @{ckpt(100 * M)}"] == pytest.approx(nces("fwd", ckpt(100 * M)))
    bwd = pl.read_csv(paper_sweep / "normalized_ces_bwd.csv").row(0, named=True)
    assert bwd["layer"] == 0 and bwd["paper @300M"] == 0.991  # Table 4, layer 0
    paper = pl.read_csv(paper_sweep / "paper.csv")
    cell = paper.filter(pl.col("quantity") == "normalized CES", pl.col("direction") == "fwd",
                        pl.col("checkpoint") == "200M").row(0, named=True)
    assert cell["paper"] == 0.968 and cell["same setting"] == "yes" and cell["source"] == "Table 3"
    assert cell["raysae"] == pytest.approx(nces("fwd", ckpt(200 * M)))
    # two layers, not the paper's twelve: the plan figures are beside the paper's, not its own
    plan = paper.filter(pl.col("quantity") == "plan tokens saved at 10%")
    assert plan["raysae"].to_list() == pytest.approx([0.45, 0.45])
    assert plan["paper"].to_list() == [0.45, 0.45] and set(plan["same setting"]) == {"no"}


def test_compute_summary_reads_plan_transfers_at_their_checkpoint(paper_sweep: Path) -> None:
    text = (paper_sweep / "compute.md").read_text()
    # forward plan: scratch L0 (CES 0.90, all its FLOPs 10) and L1<-L0 at its 100M checkpoint
    # (CES 0.7 + 0.1 * 100,003,840 / 500M, FLOPs 4 * 100,003,840 / 500M)
    t = ckpt(100 * M) / (500 * M)
    ces = (0.90 + 0.7 + t / 10) / 2
    assert f"{10 + 4 * t:.3g} | {ces:.3f} | 0.700 |" in text
    assert "forward plan: scratch on layers [0], transfer to the rest (checkpoint)" in text
    assert "tokens saved by the forward plan: 45.0%; FLOPs saved: " \
        f"{1 - (10 + 4 * t) / 20:.1%}" in text
    assert "tokens saved by the backward plan: 45.0%" in text


def test_combined_transfer_score(paper_sweep: Path) -> None:
    sim = pl.read_csv(paper_sweep / "similarity.csv")
    assert sim["combined score"].to_list() == pytest.approx([0.6, 0.6])  # (0.3 + 0.6 + 0.9) / 3


def test_another_setting_gets_the_papers_final_column_only(store: Path) -> None:
    out = report(store, "toy")
    fwd = pl.read_csv(out / "normalized_ces_fwd.csv")
    assert fwd.columns == ["layer", "2048 @1024", "2048 @2048", "paper @500M"]
    assert fwd["paper @500M"].to_list() == [0.972]
    paper = pl.read_csv(out / "paper.csv").filter(pl.col("quantity") == "normalized CES")
    assert paper.height == 2 and set(paper["same setting"]) == {"no"}  # the final cells only
    assert paper.filter(pl.col("direction") == "bwd")["raysae at"].to_list() == ["2048 @2048"]


def test_architectures_side_by_side_and_early_stopping_summary(tmp_path):
    """With several architectures in one experiment: one row per architecture, direction and
    budget, each a mean over its own runs only; the early-stopping summary is written as told
    (runs without `raysae.stop` tags: no per-transfer table, nothing to check)."""
    rows = []
    for arch, base in (("topk", 0.5), ("batchtopk", 0.7)):
        for layer in (0, 1):
            rows.append({"architecture": arch, "phase": "scratch", "direction": "scratch",
                         "budget": "100", "layer": layer, "metrics.eval/ces": base + layer / 10,
                         "metrics.eval/explained_variance": base, "metrics.eval/l0": 8.0,
                         "metrics.normalized_ces": None, "metrics.mmcs_vs_scratch": None,
                         "metrics.transfer_score/combined": None})
            rows.append({"architecture": arch, "phase": "transfer", "direction": "fwd",
                         "budget": "50", "layer": layer, "metrics.eval/ces": 0.0,
                         "metrics.eval/explained_variance": 0.0, "metrics.eval/l0": 0.0,
                         "metrics.normalized_ces": base + layer, "metrics.mmcs_vs_scratch": base / 2,
                         "metrics.transfer_score/combined": base / 4})
    t = sweep_report.architectures_table(pl.DataFrame(rows)).sort("architecture")
    assert t["architecture"].to_list() == ["batchtopk", "topk"]
    assert t["normalized CES"].to_list() == pytest.approx([1.2, 1.0])  # means over layers 0, 1
    assert t["MMCS"].to_list() == pytest.approx([0.35, 0.25])
    assert t["scratch CES"].to_list() == pytest.approx([0.75, 0.55])
    assert t["budget"].to_list() == [50, 50] and t["direction"].to_list() == ["fwd", "fwd"]

    summary = {"early_stopping": {"transfers": 4, "stopped_early": 3, "tokens": 250,
                                  "budget_tokens": 400, "saved_fraction": 0.375},
               "budget_plan": "plan for normalized CES >= 0.9 ..."}
    untagged, no_hist = pl.DataFrame({"phase": ["transfer"]}), pl.DataFrame()
    assert sweep_report.early_stopping(summary, untagged, no_hist, 0.9, tmp_path) == []
    text = (tmp_path / "early_stopping.md").read_text()
    assert text.startswith("3 of 4 transfers stopped early: 250 tokens of the 400 ")
    assert "(37.5% saved)" in text and "plan for normalized CES >= 0.9" in text
    assert not (tmp_path / "early_stopping.csv").exists()
    sweep_report.early_stopping({"plans": []}, untagged, no_hist, None, tmp_path / "none")
    assert not (tmp_path / "none").exists()


TARGET = 0.8
TOY = {**PAPER, "model.name": "toy://default/small", "sweep.layers": "[0, 1]",
       "sweep.finetune_budgets": "[2048, 4096]",
       "sweep.stop_at.normalized_ces": str(TARGET), "sweep.stop_at.check_every_tokens": "512"}


def fabricate_stopped(client: MlflowClient, root: Path, name: str,
                      transfers: list[tuple[str, str, int, int, str, list[tuple[int, float]]]]
                      ) -> None:
    """A two-layer sweep with `sweep.stop_at.normalized_ces: TARGET` whose transfers are
    (name, direction, budget, tokens used, `raysae.stop` reason, normalized CES history)."""
    used = [t[3] for t in transfers]
    budgets = [t[2] for t in transfers]
    summary = {"scratch_everywhere_tokens": 2 * 8192, "plans": [],
               "early_stopping": {"transfers": len(transfers),
                                  "stopped_early": sum(u < b for u, b in zip(used, budgets)),
                                  "tokens": sum(used), "budget_tokens": sum(budgets),
                                  "saved_fraction": 1 - sum(used) / sum(budgets)},
               "budget_plan": "cheapest plan for normalized CES >= 0.8 against the B.1 plans"}
    exp = log_parent(client, root, name, TOY, summary)
    run = functools.partial(log_run, client, exp)
    for layer in (0, 1):
        run(f"L{layer} scratch", "scratch", layer, None, "scratch", 8192, f"s{layer}",
            {"eval/ces": [(8192, 0.95)]}, tags={"raysae.tokens_seen": "8192"})
        for source in (0, 1):
            run(f"L{layer}←L{source} zero-shot", "zeroshot", layer, source, "self", 0,
                f"z{layer}{source}", {"eval/ces": [(0, 0.5)]})
    for i, (label, direction, budget, tokens, why, nces) in enumerate(transfers):
        layer, source = (1, 0) if direction == "fwd" else (0, 1)
        run(label, "transfer", layer, source, direction, budget, f"t{i}",
            {"normalized_ces": nces, "eval/ces": [(t, 0.5 + 0.45 * v) for t, v in nces]},
            tags={"raysae.tokens_seen": str(tokens), "raysae.stop": why},
            params={"train.num_tokens": str(budget)})


@pytest.fixture(scope="module")
def stop_store(tmp_path_factory, empty_mlflow_db) -> Path:
    """Two sweeps with `sweep.stop_at`: one whose target stops all hold, and one whose first
    target stop is below the target in MLflow."""
    root = tmp_path_factory.mktemp("stops")
    client = mlflow_store(empty_mlflow_db, root)
    below = TARGET - 1e-12  # within the check's slack: at the target up to rounding
    fabricate_stopped(client, root, "stopped", [
        ("L1←L0 fwd 2k", "fwd", 2048, 1536, "target: eval/ces 0.869 >= 0.86 at 1,536 tokens",
         [(512, 0.5), (1024, 0.7), (1536, 0.82)]),
        ("L1←L0 fwd 4k", "fwd", 4096, 2048, "target: eval/ces 0.86 >= 0.86 at 2,048 tokens",
         [(512, 0.4), (1024, 0.6), (1536, 0.7), (2048, below)]),
        ("L0←L1 bwd 2k", "bwd", 2048, 2048, "budget: eval/ces >= 0.86 not reached in 2,048 tokens",
         [(512, 0.5), (1024, 0.6), (1536, 0.65), (2048, 0.7)]),
        ("L0←L1 bwd 4k", "bwd", 4096, 3072, "plateau: eval/ces gained 0.001 < 0.01 over the "
         "last 2 checkpoints, at 3,072 tokens", [(1024, 0.6), (2048, 0.75), (3072, 0.75)]),
    ])
    fabricate_stopped(client, root, "short", [
        ("L1←L0 fwd 2k", "fwd", 2048, 1024, "target: eval/ces 0.86 >= 0.86 at 1,024 tokens",
         [(512, 0.85), (1024, 0.79)]),  # stopped at 1024, but its normalized CES there is 0.79
        ("L0←L1 bwd 2k", "bwd", 2048, 2048, "no target: normalized CES is undefined here; "
         "the budget runs", []),
    ])
    return root


def test_early_stopping_per_transfer_from_mlflow(stop_store: Path, capsys) -> None:
    """Each transfer's budget, tokens used and saved, stop kind and normalized CES at its stop,
    read from its run; the per-budget totals; the check line when every target stop holds."""
    out = report(stop_store, "stopped")
    t = pl.read_csv(out / "early_stopping.csv")
    assert t.columns == ["run", "layer", "source layer", "direction", "budget", "tokens used",
                         "tokens saved", "stop", "normalized CES at stop"]
    assert t.select("run", "budget", "tokens used", "tokens saved", "stop").rows() == [
        ("L0←L1 bwd 2k", 2048, 2048, 0, "budget"),
        ("L0←L1 bwd 4k", 4096, 3072, 1024, "plateau"),
        ("L1←L0 fwd 2k", 2048, 1536, 512, "target"),
        ("L1←L0 fwd 4k", 4096, 2048, 2048, "target"),
    ]
    # the value at the stop's own step, not the last or the largest logged
    assert t["normalized CES at stop"].to_list() == pytest.approx([0.7, 0.75, 0.82, TARGET])
    assert t.select("layer", "source layer").rows() == [(0, 1), (0, 1), (1, 0), (1, 0)]
    b = pl.read_csv(out / "early_stopping_by_budget.csv")
    assert b.select("direction", "budget", "stopped early", "tokens used",
                    "fixed budget tokens").rows() == [
        ("bwd", 2048, 0, 2048, 2048), ("bwd", 4096, 1, 3072, 4096),
        ("fwd", 2048, 1, 1536, 2048), ("fwd", 4096, 1, 2048, 4096)]
    assert b["saved fraction"].to_list() == pytest.approx([0.0, 0.25, 0.25, 0.5])
    text = (out / "early_stopping.md").read_text()
    line = ("early stopping check: 2 transfers stopped at the target, each at normalized "
            "CES >= 0.8 (from MLflow)")
    assert line in text and line in capsys.readouterr().out
    # the sweep's own summary line and its budget plan (the B.1 comparison) stay
    assert text.startswith("3 of 4 transfers stopped early: 8,704 tokens of the 12,288 ")
    assert "cheapest plan for normalized CES >= 0.8 against the B.1 plans" in text


def test_early_stopping_check_fails_on_a_target_stop_below_it(stop_store: Path) -> None:
    """A `target:` run whose normalized CES at its stop is below the target: the report writes
    its tables, then fails naming the run, its value and the target."""
    with pytest.raises(SystemExit, match=r"'L1←L0 fwd 2k' .* 1,024 tokens with normalized "
                                         r"CES 0\.79 < target 0\.8"):
        report(stop_store, "short")
    out = stop_store / "analysis" / "short"
    assert "early stopping check FAILED: run 'L1←L0 fwd 2k'" in (out / "early_stopping.md").read_text()
    assert (out / "paper.csv").exists()  # the tables after it are written too
    t = pl.read_csv(out / "early_stopping.csv")
    assert t["stop"].to_list() == ["no target", "target"]
    assert t["normalized CES at stop"].to_list()[0] is None  # undefined: nothing logged
