"""Feature-quality tables and figures of a layer-transfer sweep (the paper's Figures 4, 8 and
18-22), from the circuit metrics the sweep's feature phase logged on every trained SAE run.

Called by sweep_report.py; reads MLflow only (polars + matplotlib), imports no training code.
Directions: "scratch" is the paper's "No Transfer" (SAE_i on x_i), "fwd" SAE_{i<-i-1},
"bwd" SAE_{i<-i+1}. Writes:
- circuits_by_checkpoint.csv/.md  faithfulness, completeness (means over layers, tasks and N)
  and DLA per direction, budget and checkpoint (Figures 4, 8, 18, 19)
- circuits_by_n.csv/.md  faithfulness and completeness per direction and circuit size N (means
  over layers, tasks and checkpoints; Figures 20, 21)
- circuits_by_task.csv/.md  per task and direction at each run's last checkpoint, with the
  correlation of attribution patching with exact patching
- dla_by_layer.csv/.md  DLA per layer and direction at each run's last checkpoint (Figure 22)
- circuits.png  the same as curves
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.pyplot as plt
import polars as pl
from common import to_markdown
from mlflow.tracking import MlflowClient

_N = re.compile(r"^circuit/(?P<task>[^/]+)/(?P<kind>faithfulness|completeness)/n(?P<n>\d+)$")
COLORS = {"scratch": "black", "fwd": "tab:blue", "bwd": "tab:red"}
DIRECTIONS = tuple(COLORS)
KINDS = ("faithfulness", "completeness", "dla_total", "atp_exact_corr")


def _write(df: pl.DataFrame, out: Path, name: str) -> None:
    df.write_csv(out / f"{name}.csv")
    (out / f"{name}.md").write_text(to_markdown(df))


def feature_histories(client: MlflowClient, trained: pl.DataFrame) -> pl.DataFrame:
    """Long table of every circuit/DLA metric at every checkpoint: run, direction, layer,
    budget, task, kind (faithfulness, completeness, dla_total, atp_exact_corr), n, tokens,
    value. Empty when the sweep ran no feature phase."""
    names = [c.removeprefix("metrics.") for c in trained.columns
             if c.startswith(("metrics.circuit/", "metrics.dla/"))]
    rows = []
    for run_id, direction, layer, budget in trained.select(
        "run_id", "direction", "layer", "budget"
    ).iter_rows():
        for name in names:
            if (m := _N.match(name)) is not None:
                task, kind, n = m["task"], m["kind"], int(m["n"])
            elif name.startswith("dla/") and name.endswith("/total"):
                task, kind, n = name.split("/")[1], "dla_total", None
            elif name.endswith("/atp_exact_corr"):
                task, kind, n = name.split("/")[1], "atp_exact_corr", None
            else:
                continue
            for h in client.get_metric_history(run_id, name):
                rows.append((run_id, direction, layer, int(budget), task, kind, n, h.step,
                             h.timestamp, h.value))
    schema = {"run_id": pl.String, "direction": pl.String, "layer": pl.Int64, "budget": pl.Int64,
              "task": pl.String, "kind": pl.String, "n": pl.Int64, "tokens": pl.Int64,
              "logged": pl.Int64, "value": pl.Float64}
    # a re-evaluation (changed features settings) logs a step again: its latest value counts;
    # NaN marks a task whose features barely move m (eq. 8 undefined): left out of the means
    return (
        pl.DataFrame(rows, schema=schema, orient="row")
        .sort("logged", maintain_order=True)
        .unique(["run_id", "task", "kind", "n", "tokens"], keep="last", maintain_order=True)
        .filter(pl.col("value").is_not_nan())
        .drop("logged")
    )


def feature_tables(client: MlflowClient, trained: pl.DataFrame, out: Path) -> bool:
    """Write every table and the figure; False when there are no circuit metrics."""
    h = feature_histories(client, trained)
    if h.height == 0:
        return False
    per_task = h.filter(pl.col("task") != "mean")
    tasks = per_task.filter(pl.col("kind").is_in(["faithfulness", "completeness", "dla_total"]))
    by_ckpt = (
        tasks.group_by("direction", "budget", "tokens", "kind").agg(pl.col("value").mean())
        .pivot(on="kind", index=["direction", "budget", "tokens"], values="value")
        .sort("direction", "budget", "tokens")
    )
    by_ckpt = by_ckpt.select("direction", "budget", "tokens",
                             *[k for k in KINDS if k in by_ckpt.columns])
    _write(by_ckpt, out, "circuits_by_checkpoint")
    circ = tasks.filter(pl.col("kind") != "dla_total")
    by_n = (
        circ.group_by("direction", "kind", "n").agg(pl.col("value").mean())
        .with_columns(pl.format("{} N={}", pl.col("kind"), pl.col("n")).alias("column"))
        .sort(pl.col("kind").replace_strict({k: i for i, k in enumerate(KINDS)}), "n")
        .pivot(on="column", index="direction", values="value", maintain_order=True)
        .sort("direction")
    )
    _write(by_n, out, "circuits_by_n")
    last = per_task.filter(pl.col("tokens") == pl.col("tokens").max().over("run_id"))
    by_task = (
        last.group_by("task", "direction", "kind").agg(pl.col("value").mean())
        .pivot(on="kind", index=["task", "direction"], values="value")
        .sort("task", "direction")
    )
    by_task = by_task.select("task", "direction", *[k for k in KINDS if k in by_task.columns])
    _write(by_task, out, "circuits_by_task")
    dla = (
        last.filter(pl.col("kind") == "dla_total")
        .group_by("layer", "direction").agg(pl.col("value").mean())
        .pivot(on="direction", index="layer", values="value").sort("layer")
    )
    dla = dla.select("layer", *[d for d in DIRECTIONS if d in dla.columns],
                     *sorted(set(dla.columns) - {"layer", *DIRECTIONS}))
    _write(dla, out, "dla_by_layer")
    _figure(by_ckpt, circ, out)
    return True


def _figure(by_ckpt: pl.DataFrame, circ: pl.DataFrame, out: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for ax, kind in zip(axes, ("faithfulness", "completeness", "dla_total")):
        if kind not in by_ckpt.columns:
            continue
        for (direction, budget), g in by_ckpt.group_by("direction", "budget", maintain_order=True):
            g = g.sort("tokens")
            ax.plot(g["tokens"], g[kind], marker="o", ms=3, color=COLORS.get(direction, "tab:green"),
                    label=f"{direction} {budget}")
        ax.set_title(f"{kind} (mean over layers, tasks, N)", fontsize=9)
        ax.set_xlabel("tokens", fontsize=8)
        ax.legend(fontsize=6)
    ax = axes[3]
    means = circ.group_by("direction", "kind", "n").agg(pl.col("value").mean()).sort("n")
    for (direction, kind), g in means.group_by("direction", "kind", maintain_order=True):
        ax.plot(g["n"], g["value"], "-" if kind == "faithfulness" else "--", marker="o", ms=3,
                color=COLORS.get(direction, "tab:green"), label=f"{direction} {kind}")
    ax.set_title("faithfulness (-) and completeness (--) over N", fontsize=9)
    ax.set_xlabel("N (features per example)", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "circuits.png", dpi=110)
    plt.close(fig)
