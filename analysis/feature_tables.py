"""Feature-quality tables and figures of a layer-transfer sweep (the paper's Figures 4, 8 and
18-22), from the circuit metrics the sweep's feature phase logged on every trained SAE run.

Called by sweep_report.py; reads MLflow only (polars + matplotlib), imports no training code.
Directions, as runs are tagged (`raysae.reference.DIRECTION_LABELS`): "scratch" is the paper's
"No Transfer" (SAE_i on x_i), "fwd" (forward) SAE_{i<-i-1}, "bwd" (backward) SAE_{i<-i+1}.

Each ratio is averaged over its own list of circuit sizes N (`features.faithfulness_n`, the
paper's 2%-8% of d_sae; `features.completeness_n`, its 4..100), as logged. A cell is a (layer,
task) pair of a run at a checkpoint; its faithfulness and completeness are undefined (NaN, left
out of every mean) where mean-ablating every feature barely moves m (`min_feature_effect`), so
directions can average different cells: each table counts the undefined cells beside its means,
and the "common" columns average only the cells defined in every row compared. DLA comes in the
paper's form (`dla_mean`: per example the mean over the features active at the answer position,
Figure 8's "feature averaged DLA") and as the sum over features (`dla_total`). Writes:
- circuits_by_checkpoint.csv/.md  per direction, budget and checkpoint: faithfulness,
  completeness (means over layers, tasks and each one's N), cells and undefined cells, the
  means over the cells defined in every direction and budget at the same checkpoint, DLA
  (Figures 4, 8, 18, 19)
- circuits_by_direction.csv/.md  the same per direction at the last checkpoint of its runs of
  the largest budget, common cells taken across directions (the like-for-like comparison)
- circuits_by_n.csv/.md  per direction and circuit size N (means over layers, tasks and
  checkpoints), each ratio's mean over its own N, and the undefined cells (Figures 20, 21)
- circuits_by_task.csv/.md  per task and direction at each run's last checkpoint, with the
  undefined layers and the correlation of attribution patching with exact patching
- dla_by_layer.csv/.md  DLA per layer and direction at each run's last checkpoint, mean and sum
  (Figure 22)
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
_DLA = {"total": "dla_total", "mean_active": "dla_mean"}
COLORS = {"scratch": "black", "fwd": "tab:blue", "bwd": "tab:red"}
DIRECTIONS = tuple(COLORS)
RATIOS = ("faithfulness", "completeness")
KINDS = (*RATIOS, "dla_mean", "dla_total", "atp_exact_corr")
CELL = ["layer", "task"]


def _write(df: pl.DataFrame, out: Path, name: str) -> None:
    df.write_csv(out / f"{name}.csv")
    (out / f"{name}.md").write_text(to_markdown(df))


def feature_histories(client: MlflowClient, trained: pl.DataFrame) -> pl.DataFrame:
    """Long table of every circuit/DLA metric at every checkpoint: run, direction, layer,
    budget, task, kind (faithfulness, completeness, dla_mean, dla_total, atp_exact_corr), n,
    tokens, value. NaN values (undefined ratios) are kept. Empty when the sweep ran no feature
    phase."""
    names = [c.removeprefix("metrics.") for c in trained.columns
             if c.startswith(("metrics.circuit/", "metrics.dla/"))]
    rows = []
    for run_id, direction, layer, budget in trained.select(
        "run_id", "direction", "layer", "budget"
    ).iter_rows():
        for name in names:
            parts = name.split("/")
            if (m := _N.match(name)) is not None:
                task, kind, n = m["task"], m["kind"], int(m["n"])
            elif parts[0] == "dla" and len(parts) == 3 and parts[2] in _DLA:
                task, kind, n = parts[1], _DLA[parts[2]], None
            elif name.endswith("/atp_exact_corr"):
                task, kind, n = parts[1], "atp_exact_corr", None
            else:
                continue
            for h in client.get_metric_history(run_id, name):
                rows.append((run_id, direction, layer, int(budget), task, kind, n, h.step,
                             h.timestamp, h.value))
    schema = {"run_id": pl.String, "direction": pl.String, "layer": pl.Int64, "budget": pl.Int64,
              "task": pl.String, "kind": pl.String, "n": pl.Int64, "tokens": pl.Int64,
              "logged": pl.Int64, "value": pl.Float64}
    # a re-evaluation (changed features settings) logs a step again: its latest value counts
    return (
        pl.DataFrame(rows, schema=schema, orient="row")
        .sort("logged", maintain_order=True)
        .unique(["run_id", "task", "kind", "n", "tokens"], keep="last", maintain_order=True)
        .drop("logged")
    )


def _with_cell(keys: list[str]) -> list[str]:
    return [*keys, *[c for c in CELL if c not in keys]]


def cells(h: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """One row per (keys, layer, task) cell with a ratio: `defined` when none of its
    faithfulness and completeness values is NaN."""
    return (
        h.filter(pl.col("kind").is_in(RATIOS))
        .group_by(_with_cell(keys)).agg(pl.col("value").is_not_nan().all().alias("defined"))
    )


def common_cells(c: pl.DataFrame, keys: list[str], over: list[str]) -> pl.DataFrame:
    """The (over..., layer, task) cells defined in every `keys` group that shares `over`: a
    direction comparison on the cells all directions have (an empty `over` compares every
    group with every other)."""
    groups = c.select(*keys).unique()
    per_over = groups.group_by(over).len("groups") if over else groups.select(pl.len().alias("groups"))
    counted = c.filter("defined").group_by(_with_cell(over)).len("defined_in")
    joined = counted.join(per_over, on=over, how="left") if over else counted.join(per_over, how="cross")
    return joined.filter(pl.col("defined_in") == pl.col("groups")).select(_with_cell(over))


def summarise(h: pl.DataFrame, keys: list[str], over: list[str]) -> pl.DataFrame:
    """Per `keys` group: faithfulness and completeness (means over defined values), cells,
    undefined cells, common cells (defined in every group sharing `over`) and the two ratios
    over them, then DLA mean and sum."""
    c = cells(h, keys)
    common = common_cells(c, keys, over)
    ratios = h.filter(pl.col("kind").is_in(RATIOS), pl.col("value").is_not_nan())
    shared = ratios.join(common, on=_with_cell(over), how="semi")
    counts = c.group_by(keys).agg(pl.len().alias("cells"),
                                  (~pl.col("defined")).sum().cast(pl.Int64).alias("undefined"))
    n_common = (c.join(common, on=_with_cell(over), how="semi").group_by(keys)
                .agg(pl.len().alias("common cells")))

    def means(df: pl.DataFrame, suffix: str, kinds: tuple[str, ...]) -> pl.DataFrame:
        m = df.filter(pl.col("kind").is_in(kinds)).group_by(*keys, "kind").agg(pl.col("value").mean())
        m = m.with_columns(pl.col("kind") + suffix)
        return m.pivot(on="kind", index=keys, values="value")

    out = counts
    for part in (means(ratios, "", RATIOS), n_common, means(shared, " common", RATIOS),
                 means(h, "", ("dla_mean", "dla_total"))):
        out = out.join(part, on=keys, how="left")
    order = ["faithfulness", "completeness", "cells", "undefined", "common cells",
             "faithfulness common", "completeness common", "dla_mean", "dla_total"]
    out = out.with_columns(pl.col("common cells").fill_null(0).cast(pl.Int64))
    # no common cell at all: the columns stay, empty
    out = out.with_columns(pl.lit(None, pl.Float64).alias(f"{k} common") for k in RATIOS
                           if f"{k} common" not in out.columns)
    return out.select(*keys, *[k for k in order if k in out.columns]).sort(keys)


def feature_tables(client: MlflowClient, trained: pl.DataFrame, out: Path) -> bool:
    """Write every table and the figure; False when there are no circuit metrics."""
    h = feature_histories(client, trained)
    if h.height == 0:
        return False
    h = h.filter(pl.col("task") != "mean")
    by_ckpt = summarise(h, ["direction", "budget", "tokens"], over=["tokens"])
    _write(by_ckpt, out, "circuits_by_checkpoint")

    last = h.filter(pl.col("tokens") == pl.col("tokens").max().over("run_id"))
    final = last.filter(pl.col("budget") == pl.col("budget").max().over("direction"))
    _write(summarise(final, ["direction"], over=[]), out, "circuits_by_direction")

    by_n = by_size(h)
    _write(by_n, out, "circuits_by_n")
    by_task = summarise(last, ["task", "direction"], over=["task"]).select(
        "task", "direction", "faithfulness", "completeness", "undefined", "dla_mean", "dla_total")
    corr = (last.filter(pl.col("kind") == "atp_exact_corr").group_by("task", "direction")
            .agg(pl.col("value").mean().alias("atp_exact_corr")))
    _write(by_task.join(corr, on=["task", "direction"], how="left").sort("task", "direction"),
           out, "circuits_by_task")
    _write(dla_by_layer(last), out, "dla_by_layer")
    _figure(by_ckpt, h, out)
    return True


def by_size(h: pl.DataFrame) -> pl.DataFrame:
    """Per direction: each ratio per N of its own list (means over layers, tasks and
    checkpoints, defined values only), its mean over those N, and the undefined cells."""
    ratios = h.filter(pl.col("kind").is_in(RATIOS), pl.col("value").is_not_nan())
    per_n = (ratios.group_by("direction", "kind", "n").agg(pl.col("value").mean())
             .with_columns(pl.format("{} N={}", pl.col("kind"), pl.col("n")).alias("column")))
    whole = ratios.group_by("direction", "kind").agg(pl.col("value").mean()).rename({"kind": "column"})
    columns = []
    for kind in RATIOS:
        sizes = sorted(per_n.filter(pl.col("kind") == kind)["n"].unique().to_list())
        columns += [f"{kind} N={n}" for n in sizes] + ([kind] if sizes else [])
    wide = pl.concat([per_n.select("direction", "column", "value"),
                      whole.select("direction", "column", "value")])
    wide = wide.pivot(on="column", index="direction", values="value")
    c = cells(h, ["direction", "budget", "tokens"])
    counts = c.group_by("direction").agg(pl.len().alias("cells"),
                                         (~pl.col("defined")).sum().cast(pl.Int64).alias("undefined"))
    return wide.join(counts, on="direction", how="left").select(
        "direction", *columns, "cells", "undefined").sort("direction")


def dla_by_layer(last: pl.DataFrame) -> pl.DataFrame:
    """Per layer: each direction's feature-averaged DLA (the paper's form) and its sum over
    features, at each run's last checkpoint, means over tasks and budgets."""
    dla = (last.filter(pl.col("kind").is_in(["dla_mean", "dla_total"]))
           .group_by("layer", "direction", "kind").agg(pl.col("value").mean())
           .with_columns(pl.format("{} {}", pl.col("direction"),
                                   pl.col("kind").replace_strict({"dla_mean": "mean",
                                                                  "dla_total": "sum"})).alias("column"))
           .pivot(on="column", index="layer", values="value").sort("layer"))
    present = [d for d in DIRECTIONS if f"{d} mean" in dla.columns]
    present += sorted({c.rsplit(" ", 1)[0] for c in dla.columns if c != "layer"} - set(present))
    return dla.select("layer", *[f"{d} {k}" for d in present for k in ("mean", "sum")
                                 if f"{d} {k}" in dla.columns])


def _figure(by_ckpt: pl.DataFrame, h: pl.DataFrame, out: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    titles = {"faithfulness": "faithfulness (mean over layers, tasks, its N)",
              "completeness": "completeness (mean over layers, tasks, its N)",
              "dla_mean": "feature-averaged DLA (mean over layers, tasks)"}
    for ax, kind in zip(axes, titles):
        if kind not in by_ckpt.columns:
            continue
        for (direction, budget), g in by_ckpt.group_by("direction", "budget", maintain_order=True):
            g = g.sort("tokens")
            ax.plot(g["tokens"], g[kind], marker="o", ms=3, color=COLORS.get(direction, "tab:green"),
                    label=f"{direction} {budget}")
        ax.set_title(titles[kind], fontsize=9)
        ax.set_xlabel("tokens", fontsize=8)
        ax.legend(fontsize=6)
    ax = axes[3]
    ratios = h.filter(pl.col("kind").is_in(RATIOS), pl.col("value").is_not_nan())
    means = ratios.group_by("direction", "kind", "n").agg(pl.col("value").mean()).sort("n")
    for (direction, kind), g in means.group_by("direction", "kind", maintain_order=True):
        ax.plot(g["n"], g["value"], "-" if kind == "faithfulness" else "--", marker="o", ms=3,
                color=COLORS.get(direction, "tab:green"), label=f"{direction} {kind}")
    ax.set_title("faithfulness (-) and completeness (--) over N", fontsize=9)
    ax.set_xlabel("N (features per example)", fontsize=8)
    ax.set_xscale("log")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "circuits.png", dpi=110)
    plt.close(fig)
