"""analysis/feature_tables.py on a fabricated sqlite MLflow store with known circuit metrics:
each ratio averaged over its own N list (per N too), undefined cells counted per direction and
left out of the means, directions compared on the cells all of them have, DLA in the paper's
feature-averaged form beside the sum, and a re-evaluated checkpoint counted by its latest
value only."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import cast

import polars as pl
import pytest
from conftest import mlflow_store
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from feature_tables import feature_tables  # noqa: E402

LAYERS = {"scratch": (0, 1, 2), "fwd": (1, 2), "bwd": (0, 1)}  # only layer 1 is in all three
FAITH_N, COMPL_N, STEPS, TASKS = (4, 8), (2, 16), (100, 200), ("a", "b")
UNDEFINED = {("scratch", 1, "a", 100), ("bwd", 1, "b", 200)}  # (direction, layer, task, step)


def faith(direction: str, layer: int, task: str, n: int, step: int) -> float:
    base = {"scratch": 0.5, "fwd": 0.6, "bwd": 0.4}[direction]
    return base + (0.1 if task == "b" else 0.0) + layer / 10 + n / 100 + step / 1000


def compl(direction: str, layer: int, task: str, n: int, step: int) -> float:
    return 1 - faith(direction, layer, task, n, step) / 2


def dla_total(layer: int, task: str, step: int) -> float:
    return layer + step / 100 + (1.0 if task == "b" else 0.0)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def tables(tmp_path_factory, empty_mlflow_db) -> Path:
    tmp = tmp_path_factory.mktemp("ft")
    client = mlflow_store(empty_mlflow_db, tmp)
    exp = client.create_experiment("ft", (tmp / "art").as_uri())
    rows = []
    for direction, layers in LAYERS.items():
        for layer in layers:
            run_id = client.create_run(exp, run_name=f"{direction} L{layer}").info.run_id
            for step in STEPS:
                ms = []
                for task in TASKS:
                    for n in FAITH_N:
                        ms.append(Metric(f"circuit/{task}/faithfulness/n{n}",
                                         faith(direction, layer, task, n, step), 1, step))
                    for n in COMPL_N:
                        ms.append(Metric(f"circuit/{task}/completeness/n{n}",
                                         compl(direction, layer, task, n, step), 1, step))
                    total = dla_total(layer, task, step)
                    ms.append(Metric(f"dla/{task}/total", total, 1, step))
                    ms.append(Metric(f"dla/{task}/mean_active", total / 10, 1, step))
                    ms.append(Metric(f"circuit/{task}/atp_exact_corr", 0.9, 1, step))
                ms.append(Metric("circuit/mean/faithfulness/n4", 0.0, 1, step))  # not a task
                client.log_batch(run_id, metrics=ms)
            # a later re-evaluation finds some cells undefined (features barely move m)
            client.log_batch(run_id, metrics=[
                Metric(f"circuit/{task}/{kind}/n{n}", math.nan, 2, step)
                for (d, lay, task, step) in UNDEFINED if (d, lay) == (direction, layer)
                for kind, sizes in (("faithfulness", FAITH_N), ("completeness", COMPL_N))
                for n in sizes])
            cols = {f"metrics.circuit/{t}/{k}/n{n}": 0.0 for t in TASKS
                    for k, sizes in (("faithfulness", FAITH_N), ("completeness", COMPL_N))
                    for n in sizes}
            cols |= {f"metrics.dla/{t}/{k}": 0.0 for t in TASKS for k in ("total", "mean_active")}
            rows.append({"run_id": run_id, "direction": direction, "layer": layer,
                         "budget": "200", "metrics.circuit/a/atp_exact_corr": 0.0,
                         "metrics.circuit/mean/faithfulness/n4": 0.0, **cols})
    out = tmp / "out"
    out.mkdir()
    assert feature_tables(client, pl.DataFrame(rows), out)
    return out


def defined(direction: str, layer: int, task: str, step: int) -> bool:
    return (direction, layer, task, step) not in UNDEFINED


def expected(fn, direction: str, sizes, steps=STEPS, layers=None, tasks=TASKS) -> float:
    return mean([fn(direction, lay, t, n, s) for lay in layers or LAYERS[direction] for t in tasks
                 for s in steps for n in sizes if defined(direction, lay, t, s)])


def row(df: pl.DataFrame, **where) -> dict:
    sel = df.filter(*[pl.col(k) == v for k, v in where.items()])
    assert sel.height == 1, where
    return sel.row(0, named=True)


def test_by_checkpoint_means_over_each_ratios_own_n_and_undefined_counts(tables: Path) -> None:
    by_ckpt = pl.read_csv(tables / "circuits_by_checkpoint.csv")
    assert by_ckpt.columns == ["direction", "budget", "tokens", "faithfulness", "completeness",
                               "cells", "undefined", "common cells", "faithfulness common",
                               "completeness common", "dla_mean", "dla_total"]
    for direction in LAYERS:
        for step in STEPS:
            r = row(by_ckpt, direction=direction, tokens=step)
            assert r["faithfulness"] == pytest.approx(expected(faith, direction, FAITH_N, [step]))
            assert r["completeness"] == pytest.approx(expected(compl, direction, COMPL_N, [step]))
            assert r["cells"] == 2 * len(LAYERS[direction])
            assert r["undefined"] == sum(not defined(direction, lay, t, step)
                                         for lay in LAYERS[direction] for t in TASKS)
            totals = [dla_total(lay, t, step) for lay in LAYERS[direction] for t in TASKS]
            assert r["dla_total"] == pytest.approx(mean(totals))
            assert r["dla_mean"] == pytest.approx(mean(totals) / 10)
    # the cells every direction has defined: layer 1 only; task b at step 100 (scratch's task a
    # is undefined there), task a at step 200 (bwd's task b is)
    for step, task in ((100, "b"), (200, "a")):
        for direction in LAYERS:
            r = row(by_ckpt, direction=direction, tokens=step)
            assert r["common cells"] == 1
            assert r["faithfulness common"] == pytest.approx(
                expected(faith, direction, FAITH_N, [step], [1], [task]))
            assert r["completeness common"] == pytest.approx(
                expected(compl, direction, COMPL_N, [step], [1], [task]))


def test_by_direction_compares_on_common_cells(tables: Path) -> None:
    by_dir = pl.read_csv(tables / "circuits_by_direction.csv")
    assert by_dir["direction"].to_list() == ["bwd", "fwd", "scratch"]
    for direction in LAYERS:  # every run's last checkpoint is step 200
        r = row(by_dir, direction=direction)
        assert r["undefined"] == (1 if direction == "bwd" else 0)
        assert r["faithfulness"] == pytest.approx(expected(faith, direction, FAITH_N, [200]))
        assert r["common cells"] == 1
        assert r["faithfulness common"] == pytest.approx(faith(direction, 1, "a", 4, 200) / 2
                                                         + faith(direction, 1, "a", 8, 200) / 2)
    # the plain means mix different cells: bwd lacks layer 2 and task b of layer 1
    fwd, bwd = row(by_dir, direction="fwd"), row(by_dir, direction="bwd")
    assert fwd["faithfulness common"] - bwd["faithfulness common"] == pytest.approx(0.2)
    assert fwd["faithfulness"] - bwd["faithfulness"] != pytest.approx(0.2)


def test_by_n_per_size_and_per_list(tables: Path) -> None:
    by_n = pl.read_csv(tables / "circuits_by_n.csv")
    assert by_n.columns == ["direction", "faithfulness N=4", "faithfulness N=8", "faithfulness",
                            "completeness N=2", "completeness N=16", "completeness", "cells",
                            "undefined"]
    for direction in LAYERS:
        r = row(by_n, direction=direction)
        for n in FAITH_N:
            assert r[f"faithfulness N={n}"] == pytest.approx(expected(faith, direction, [n]))
        for n in COMPL_N:
            assert r[f"completeness N={n}"] == pytest.approx(expected(compl, direction, [n]))
        assert r["faithfulness"] == pytest.approx(expected(faith, direction, FAITH_N))
        assert r["completeness"] == pytest.approx(expected(compl, direction, COMPL_N))
        assert r["cells"] == 2 * 2 * len(LAYERS[direction])  # layers x tasks x checkpoints
        assert r["undefined"] == sum(d == direction for d, *_ in UNDEFINED)


def test_dla_by_layer_mean_and_sum_and_by_task(tables: Path) -> None:
    dla = pl.read_csv(tables / "dla_by_layer.csv")
    assert dla.columns == ["layer", "scratch mean", "scratch sum", "fwd mean", "fwd sum",
                           "bwd mean", "bwd sum"]
    assert dla["layer"].to_list() == [0, 1, 2]
    r = row(dla, layer=2)
    assert r["fwd sum"] == pytest.approx(mean([dla_total(2, t, 200) for t in TASKS]))
    assert r["fwd mean"] == pytest.approx(r["fwd sum"] / 10)
    assert r["bwd mean"] is None
    by_task = pl.read_csv(tables / "circuits_by_task.csv")
    assert by_task.columns == ["task", "direction", "faithfulness", "completeness", "undefined",
                               "dla_mean", "dla_total", "atp_exact_corr"]
    assert row(by_task, task="b", direction="bwd")["undefined"] == 1
    assert row(by_task, task="b", direction="bwd")["faithfulness"] == pytest.approx(
        expected(faith, "bwd", FAITH_N, [200], tasks=["b"]))
    assert by_task.filter(pl.col("task") == "a")["atp_exact_corr"].to_list() == [0.9] * 3
    assert (tables / "circuits.png").read_bytes()[:4] == b"\x89PNG"


def test_no_circuit_metrics_no_tables(tmp_path: Path) -> None:
    client = cast(MlflowClient, None)  # never queried: the runs have no circuit metrics
    df = pl.DataFrame({"run_id": ["x"], "direction": ["fwd"], "layer": [1], "budget": ["10"],
                       "metrics.eval/ces": [0.9]})
    assert not feature_tables(client, df, tmp_path)
    assert not list(tmp_path.glob("circuits*"))
