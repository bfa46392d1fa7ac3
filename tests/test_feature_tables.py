"""analysis/feature_tables.py on a fabricated sqlite MLflow store with known circuit metrics:
the means per direction, checkpoint and N, NaN (undefined) ratios left out, and a re-evaluated
checkpoint counted by its latest value only."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import polars as pl
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from feature_tables import feature_tables  # noqa: E402

RUNS = {  # name: (direction, layer, budget)
    "L0 scratch": ("scratch", 0, 200),
    "L1←L0 fwd": ("fwd", 1, 200),
    "L0←L1 bwd": ("bwd", 0, 200),
}


def faith(direction: str, task: str, n: int, step: int) -> float:
    """A known value per (direction, task, N, checkpoint)."""
    base = {"scratch": 0.5, "fwd": 0.6, "bwd": 0.4}[direction]
    return base + (0.1 if task == "b" else 0.0) + n / 100 + step / 1000


def test_tables_from_known_metrics(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("ft", (tmp_path / "art").as_uri())
    rows = []
    for name, (direction, layer, budget) in RUNS.items():
        run_id = client.create_run(exp, run_name=name).info.run_id
        for step in (100, 200):
            ms = []
            for task in ("a", "b"):
                for n in (4, 8):
                    ms.append(Metric(f"circuit/{task}/faithfulness/n{n}",
                                     faith(direction, task, n, step), 1, step))
                    ms.append(Metric(f"circuit/{task}/completeness/n{n}", 1 - n / 10, 1, step))
                ms.append(Metric(f"dla/{task}/total", layer + step / 100, 1, step))
                ms.append(Metric(f"circuit/{task}/atp_exact_corr", 0.9, 1, step))
            client.log_batch(run_id, metrics=ms)
        # a later re-evaluation finds task b undefined at step 200 (features barely move m)
        client.log_batch(run_id, metrics=[
            Metric(f"circuit/b/faithfulness/n{n}", math.nan, 2, 200) for n in (4, 8)])
        rows.append({"run_id": run_id, "direction": direction, "layer": layer, "budget": str(budget),
                     "metrics.circuit/a/faithfulness/n4": 0.0, "metrics.circuit/b/faithfulness/n8": 0.0,
                     "metrics.circuit/a/faithfulness/n8": 0.0, "metrics.circuit/b/faithfulness/n4": 0.0,
                     "metrics.circuit/a/completeness/n4": 0.0, "metrics.circuit/a/completeness/n8": 0.0,
                     "metrics.circuit/b/completeness/n4": 0.0, "metrics.circuit/b/completeness/n8": 0.0,
                     "metrics.dla/a/total": 0.0, "metrics.dla/b/total": 0.0,
                     "metrics.circuit/a/atp_exact_corr": 0.0, "metrics.eval/ces": 0.0})
    out = tmp_path / "out"
    out.mkdir()
    assert feature_tables(client, pl.DataFrame(rows), out)

    by_ckpt = pl.read_csv(out / "circuits_by_checkpoint.csv")
    assert by_ckpt.columns == ["direction", "budget", "tokens", "faithfulness", "completeness",
                               "dla_total"]
    for direction in ("scratch", "fwd", "bwd"):
        def row(step: int, direction: str = direction) -> dict:
            sel = by_ckpt.filter(pl.col("direction") == direction, pl.col("tokens") == step)
            return sel.row(0, named=True)

        both = [faith(direction, t, n, 100) for t in "ab" for n in (4, 8)]
        assert row(100)["faithfulness"] == pytest.approx(sum(both) / 4)
        only_a = [faith(direction, "a", n, 200) for n in (4, 8)]  # b's NaN replaced its old value
        assert row(200)["faithfulness"] == pytest.approx(sum(only_a) / 2)
        assert row(100)["completeness"] == pytest.approx((0.6 + 0.2) / 2)
        layer = RUNS[next(k for k, v in RUNS.items() if v[0] == direction)][1]
        assert row(200)["dla_total"] == pytest.approx(layer + 2)

    by_n = pl.read_csv(out / "circuits_by_n.csv")
    assert by_n.columns == ["direction", "faithfulness N=4", "faithfulness N=8",
                            "completeness N=4", "completeness N=8"]
    fwd = by_n.filter(pl.col("direction") == "fwd").row(0, named=True)
    expected = [faith("fwd", "a", 4, 100), faith("fwd", "b", 4, 100), faith("fwd", "a", 4, 200)]
    assert fwd["faithfulness N=4"] == pytest.approx(sum(expected) / 3)
    dla = pl.read_csv(out / "dla_by_layer.csv")
    assert dla.columns == ["layer", "scratch", "fwd", "bwd"]
    assert dla["layer"].to_list() == [0, 1]
    by_task = pl.read_csv(out / "circuits_by_task.csv")
    assert by_task.columns == ["task", "direction", "faithfulness", "completeness", "dla_total",
                               "atp_exact_corr"]
    assert by_task.filter(pl.col("task") == "a")["atp_exact_corr"].to_list() == [0.9] * 3
    assert (out / "circuits.png").read_bytes()[:4] == b"\x89PNG"


def test_no_circuit_metrics_no_tables(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    df = pl.DataFrame({"run_id": ["x"], "direction": ["fwd"], "layer": [1], "budget": ["10"],
                       "metrics.eval/ces": [0.9]})
    assert not feature_tables(client, df, tmp_path)
    assert not list(tmp_path.glob("circuits*"))
