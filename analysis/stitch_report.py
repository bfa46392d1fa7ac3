"""Tables and figures of a model-stitching sweep, from its MLflow runs only (polars + matplotlib).

    python analysis/stitch_report.py EXPERIMENT [--runs-dir runs] [--out DIR] [--no-log]

Writes to `<out>/<experiment>/` (default out: <runs-dir>/analysis), each table as .csv and .md:
- stitch_ce           next-token CE of A, B, the two stitched models, the two round trips and
                      the least-squares baseline, with the maps' explained variances (Table 1)
- sae_transfer        A's SAE on A, carried zero-shot to B, and B's own SAEs (Table 2)
- flops_to_threshold  training FLOPs of B's SAE to first reach each explained variance of
                      `stitch.ev_thresholds`, from scratch and from the stitch (stitch FLOPs,
                      least-squares start included), and the saving; curves.png: explained
                      variance against FLOPs
- scaling_fit         FVU = A * FLOPs^-beta fitted to each training curve
- scaling_fit_model   the same law fitted once per pair and init over all widths (the paper's)
- paper               every number of the stitching paper (raysae/reference/stitching.json)
                      beside this sweep's figure for it
- probes, sparse_probes, steering   probes and steering vectors of A used on B through the stitch
- feature_classes     (+ .png) transfer quality of structural and semantic features
- layer_match         (+ .png) the layer-matching matrix, when the sweep computed one
- circuits            task circuits of every SAE (A's, B's zero-shot, stitched-init and scratch
                      ones): faithfulness and completeness averaged over tasks and circuit
                      sizes, direct logit attribution, the AtP check (with `features:`)
and logs them as artifacts of a `<experiment> stitch summary` run (unless --no-log). A piece
whose runs are missing is skipped with a note. Reads nothing but MLflow (and the paper's
numbers, raysae/reference/stitching.json): the tracking URI is --tracking-uri (the job's tracking_uri), else MLFLOW_TRACKING_URI, else sqlite
under the runs directory.

Every explained variance is the held-out one (fp64, around the mean) logged at checkpoints
(`eval/explained_variance`; the stitched init's curve starts at its zero-shot evaluation), never
the training batches'. FLOPs come in two accountings, both in every FLOPs table: as run (`flops`:
raysae's sparse TopK kernels at their real cost) and dense (`flops_dense_equiv`: a dense TopK
implementation, the paper's); a stitch is dense, so its FLOPs are the same in both. A table with
a "paper" column shows the paper's number where this sweep's setting is the paper's.
Each table's markdown starts with a note saying which EV and which FLOPs it reads.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from common import report_args, to_markdown, tracking_uri  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from raysae.reference import load as load_reference  # noqa: E402  (data only, no training code)
from raysae.reference import lookup, settings_of  # noqa: E402

TAG = "tags.raysae."
ROLES = ("stitch_sweep", "stitch", "scratch_a", "scratch_b", "zeroshot", "transfer", "probes")
ROLE_KEYS = ["role", "pair", "layer_a", "layer_b", "width", "budget"]
DEFAULT_THRESHOLDS = (0.7, 0.8, 0.9)
FIT_SKIP_FRACTION = 0.1
"""The scaling fit ignores the first 10% of each run's tokens (the warm-up transient)."""
CURVE_METRIC = "eval/explained_variance"
"""The held-out explained variance of each checkpoint (fp64, variance around the mean)."""
ACCOUNTINGS = {"as run": "flops", "dense": "flops_dense"}
"""The FLOPs columns of the curves: as raysae runs the step, and as a dense TopK counts it."""
REFERENCE = load_reference("stitching")
CLASS_ORDER = {"structural": 0, "semantic": 1, "inactive": 2}

STITCH_COLUMNS = {
    "ce/a": "CE A",
    "ce/b": "CE B",
    "ce/a_to_b": "A→B",
    "ce/b_to_a": "B→A",
    "ce/a_round_trip": "A round trip",
    "ce/b_round_trip": "B round trip",
    "lstsq/ce/a_to_b": "lstsq A→B",
    "lstsq/ce/b_to_a": "lstsq B→A",
    "map/up_ev": "up EV",
    "map/down_ev": "down EV",
    "map/round_trip_a_ev": "A round-trip EV",
    "map/round_trip_b_ev": "B round-trip EV",
    "lstsq/map/up_ev": "lstsq up EV",
    "lstsq/map/down_ev": "lstsq down EV",
    "flops": "stitch FLOPs",
    "lstsq/flops": "of which lstsq FLOPs",
}
PAPER_CE = {"ce/a": "paper CE A", "ce/b": "paper CE B", "ce/a_to_b": "paper A→B",
            "ce/b_to_a": "paper B→A"}
NOTES = {
    "stitch_ce": "CE in nats on held-out tokens, each the stitch run's final value. stitch FLOPs: "
                 "its training and its least-squares start (of which lstsq FLOPs), all dense "
                 "products, so as run and dense agree. paper: the paper's number where this pair "
                 "is the paper's.",
    "sae_transfer": "EV and FVU: held-out (fp64, around the mean) at each run's last checkpoint. "
                    "paper: the paper's FVU where this pair is the paper's.",
    "flops_to_threshold": "EV: held-out (fp64, around the mean) at checkpoints; the stitched init "
                          "starts at its zero-shot EV. Each threshold is crossed after a curve's "
                          "last checkpoint below it (last below, tokens) and by its first checkpoint "
                          "at or above it (tokens): the FLOPs are that checkpoint's, an upper bound "
                          "within one checkpoint interval, never interpolated. FLOPs: as run "
                          "(raysae's sparse TopK kernels); FLOPs dense: as a dense TopK counts them "
                          "(the paper's accounting). The stitch's FLOPs (training and least squares, "
                          "the same in both) count against the stitched init, the small SAE's do not.",
    "scaling_fit": "FVU = A * C^-beta per training curve, least squares in log-log on the held-out "
                   "EV at checkpoints after the curve's first 10% of tokens; FLOPs: the accounting "
                   "of C (as run, or dense: the paper's), stitch included for the stitched init.",
    "scaling_fit_model": "FVU = A * C^-beta fitted once per pair (B's model and layer) and init over "
                         "the checkpoints of every width (each width's largest budget, after its "
                         "first 10% of tokens), as the paper fits L(C); paper A and beta (dense C) "
                         "where B's model and layer are the paper's.",
    "paper": "Every number of raysae/reference/stitching.json beside this sweep's figure for it; "
             "same setting says whether the pair is the one the paper measured (otherwise the "
             "sweep's figures are its own, e.g. the toy demo's). FLOPs savings in the dense "
             "accounting, as the paper's.",
}


def metric(runs: pl.DataFrame, key: str) -> pl.Expr:
    """A run's latest value of `key` (MLflow's run table), null where no run logged it."""
    name = f"metrics.{key}"
    return pl.col(name) if name in runs.columns else pl.lit(None, dtype=pl.Float64)


def load_runs(experiment: str) -> pl.DataFrame:
    """One row per role of the stitch sweep; of reruns, the latest finished run wins."""
    runs = mlflow.search_runs(
        experiment_names=[experiment], filter_string="tags.`raysae.sweep_kind` = 'stitch'"
    )
    if len(runs) == 0:
        raise SystemExit(f"no stitch-sweep runs in experiment {experiment!r}")
    text = [c for c in runs.columns if c.startswith(("tags.", "params."))]
    df = pl.from_pandas(runs.astype({c: str for c in text}))
    df = df.rename({c: c.removeprefix(TAG) for c in df.columns if c.startswith(TAG)})
    # astype(str) spells a missing tag "None" or "nan"; schema tags use "" for "not this model"
    df = df.with_columns(
        pl.when(pl.col(c).is_in(["", "None", "nan"])).then(None).otherwise(pl.col(c)).alias(c)
        for c in df.columns if df.schema[c] == pl.String
    )
    df = df.with_columns(pl.lit(None, dtype=pl.String).alias(c) for c in ROLE_KEYS if c not in df.columns)
    df = df.with_columns(pl.col(c).cast(pl.Int64) for c in ("layer_a", "layer_b", "width", "budget"))
    return (
        df.filter(pl.col("role").is_in(ROLES))
        .sort(pl.col("status") != "FINISHED", pl.col("start_time"), descending=[False, True])
        .unique(ROLE_KEYS, keep="first", maintain_order=True)
    )


def role(runs: pl.DataFrame, name: str) -> pl.DataFrame:
    return runs.filter(pl.col("role") == name)


def largest_budget(df: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    return df.sort("budget", descending=True, nulls_last=True).unique(keys, keep="first")


def pairs(runs: pl.DataFrame) -> pl.DataFrame:
    return (
        runs.filter(pl.col("pair").is_not_null())
        .select("pair", "layer_a", "layer_b")
        .unique()
        .sort("layer_a", "layer_b")
    )


def sweep_thresholds(runs: pl.DataFrame) -> tuple[float, ...]:
    """`stitch.ev_thresholds` of the parent run (a tuple's str, as MLflow params are)."""
    parent = role(runs, "stitch_sweep")
    col = "params.stitch.ev_thresholds"
    if parent.height == 0 or col not in parent.columns or parent[col][0] is None:
        print(f"note: no {col} on a stitch_sweep run; thresholds {DEFAULT_THRESHOLDS}")
        return DEFAULT_THRESHOLDS
    value = ast.literal_eval(parent[col][0])
    return tuple(float(v) for v in (value if isinstance(value, list | tuple) else [value]))


def write_table(df: pl.DataFrame, out: Path, name: str, title: str) -> None:
    """Full precision in the csv; in the markdown, FLOPs in 3 significant digits, after the
    table's note (what it reads: which EV, which FLOPs)."""
    df.write_csv(out / f"{name}.csv")
    big = [c for c in df.columns if "FLOPs" in c and df.schema[c] == pl.Float64]
    md = to_markdown(df.with_columns(
        pl.col(c).map_elements(lambda v: f"{v:.3g}", return_dtype=pl.String) for c in big))
    note = NOTES.get(name)
    md = f"{note}\n\n{md}" if note else md
    (out / f"{name}.md").write_text(md)
    print(f"{title}:\n{md}")


def sweep_settings(runs: pl.DataFrame) -> dict[str, dict]:
    """Per pair, what the reference numbers' settings are matched against: the sweep's models
    (the parent run's params) and the pair's layers."""
    parent = role(runs, "stitch_sweep")

    def param(name: str) -> str | None:
        col = f"params.{name}"
        return parent[col][0] if parent.height and col in parent.columns else None

    models = {"model_a": param("model.name"), "model_b": param("stitch.large.name")}
    return {pair: {**models, "layer_a": la, "layer_b": lb} for pair, la, lb in pairs(runs).iter_rows()}


def paper_value(name: str, setting: dict | None, field: str = "value") -> float | None:
    """The paper's `field` of number `name` where `setting` is the paper's, else None."""
    number = lookup(REFERENCE, name, setting) if setting else None
    return None if number is None else number.get(field)


def paper_column(df: pl.DataFrame, settings: dict[str, dict], name: str, field: str = "value"
                 ) -> pl.Series:
    return pl.Series([paper_value(name, settings.get(p), field) for p in df["pair"]],
                     dtype=pl.Float64)


def stitch_ce(runs: pl.DataFrame, settings: dict[str, dict] | None = None) -> pl.DataFrame | None:
    """Table 1: one row per pair, every value the stitch run's final one; the paper's CEs
    where the pair is the paper's."""
    s = role(runs, "stitch")
    if s.height == 0:
        return None
    table = s.sort("layer_a", "layer_b").select(
        "pair", pl.col("layer_a").alias("layer A"), pl.col("layer_b").alias("layer B"),
        *[metric(s, k).alias(v) for k, v in STITCH_COLUMNS.items()],
    )
    return table.with_columns(paper_column(table, settings or {}, k).alias(v)
                              for k, v in PAPER_CE.items())


def sae_transfer(runs: pl.DataFrame, settings: dict[str, dict] | None = None) -> pl.DataFrame | None:
    """Table 2: per pair and width, A's SAE on A, zero-shot on B, and B's SAEs at the largest
    budget (from scratch, and from the stitch for comparison); the paper's FVUs where the pair
    is the paper's."""
    z, t = role(runs, "zeroshot"), role(runs, "transfer")
    base = pl.concat([d.select("pair", "layer_a", "layer_b", "width") for d in (z, t)]).unique()
    if base.height == 0:
        return None

    def quality(df: pl.DataFrame, prefix: str, keys: list[str], l0: bool = True) -> pl.DataFrame:
        ev = metric(df, "eval/explained_variance")
        cols = [ev.alias(f"{prefix} EV"), (1 - ev).alias(f"{prefix} FVU"),
                metric(df, "eval/ces").alias(f"{prefix} CES")]
        return df.select(*keys, *cols, *([metric(df, "eval/l0").alias(f"{prefix} L0")] if l0 else []))

    a = quality(largest_budget(role(runs, "scratch_a"), ["layer_a", "width"]), "A", ["layer_a", "width"])
    zq = quality(z, "zero-shot", ["pair", "width"])
    sb = role(runs, "scratch_b").select(
        "layer_b", "width", "budget", metric(runs, "eval/explained_variance").alias("B scratch EV"),
        metric(runs, "eval/ces").alias("B scratch CES"))
    tb = t.select("pair", "width", "budget",
                  metric(runs, "eval/explained_variance").alias("B stitch-init EV"),
                  metric(runs, "eval/ces").alias("B stitch-init CES"))
    budget = pl.concat([
        base.join(sb, on=["layer_b", "width"]).select("pair", "width", "budget"),
        tb.select("pair", "width", "budget"),
    ]).group_by("pair", "width").agg(pl.col("budget").max().alias("B budget"))
    table = (
        base.join(a, on=["layer_a", "width"], how="left")
        .join(zq, on=["pair", "width"], how="left")
        .join(budget, on=["pair", "width"], how="left")
        .join(sb, left_on=["layer_b", "width", "B budget"], right_on=["layer_b", "width", "budget"],
              how="left")
        .join(tb, left_on=["pair", "width", "B budget"], right_on=["pair", "width", "budget"],
              how="left")
        .sort("layer_a", "layer_b", "width")
        .drop("layer_a", "layer_b")
    )
    return table.with_columns(paper_column(table, settings or {}, "fvu/a").alias("paper A FVU"),
                              paper_column(table, settings or {}, "fvu/zeroshot").alias("paper zero-shot FVU"))


def ev_curves(client: MlflowClient, runs: pl.DataFrame) -> pl.DataFrame | None:
    """Long table of B's SAE checkpoints: pair, width, budget, init, tokens, flops, flops_dense,
    stitch_flops, ev.

    ev is the held-out explained variance each checkpoint logged (`eval/explained_variance`,
    step = tokens seen); a stitched-init curve starts at 0 tokens with its zero-shot evaluation
    (the same SAE, on the same held-out tokens). FLOPs at a checkpoint = tokens x the run's
    FLOPs per token (flops / tokens_seen as run, flops_dense_equiv / tokens_seen dense), plus
    for the stitched init the stitch's own FLOPs (the transfer run's stitch_flops, else the
    stitch run's flops), training and least-squares start, dense in both accountings. A scratch
    run of B's layer appears once under each pair that stitches into that layer.
    """
    p = pairs(runs)
    stitch_flops = role(runs, "stitch").select("pair", metric(runs, "flops").alias("from_stitch"))

    def per_token(key: str) -> pl.Expr:
        return metric(runs, key) / metric(runs, "tokens_seen")

    rates = [per_token("flops").alias("per_token"), per_token("flops_dense_equiv").alias("dense")]
    trained = pl.concat([
        role(runs, "transfer").join(stitch_flops, on="pair", how="left").select(
            "run_id", "pair", "width", "budget", pl.lit("stitch").alias("init"),
            pl.coalesce(metric(runs, "stitch_flops"), pl.col("from_stitch")).alias("offset"), *rates),
        role(runs, "scratch_b").drop("pair").join(p.select("pair", "layer_b"), on="layer_b").select(
            "run_id", "pair", "width", "budget", pl.lit("scratch").alias("init"),
            pl.lit(0.0).alias("offset"), *rates),
    ])
    if trained.height == 0:
        return None
    missing = trained.filter(pl.col("offset").is_null())
    if missing.height:
        print(f"note: no stitch FLOPs for pairs {missing['pair'].unique().to_list()}; counted as 0")
    no_rate = trained.filter(pl.col("per_token").is_null())
    if no_rate.height:
        print(f"note: no flops/tokens_seen on runs {no_rate['run_id'].to_list()}; skipped")
    no_dense = trained.filter(pl.col("per_token").is_not_null() & pl.col("dense").is_null())
    if no_dense.height:
        print(f"note: no flops_dense_equiv on runs {no_dense['run_id'].to_list()} (logged before "
              "raysae counted it); their dense FLOPs are left empty")
    trained = trained.filter(pl.col("per_token").is_not_null()).with_columns(pl.col("offset").fill_null(0.0))
    zeroshot = {(pair, width): ev for pair, width, ev in role(runs, "zeroshot").select(
        "pair", "width", metric(runs, CURVE_METRIC)).iter_rows() if ev is not None}
    rows = []
    for run_id, pair, width, budget, init, offset, rate, dense in trained.iter_rows():
        points = [(m.step, m.value) for m in client.get_metric_history(run_id, CURVE_METRIC)]
        if init == "stitch" and (pair, width) in zeroshot:
            points.append((0, zeroshot[pair, width]))
        for tokens, ev in points:
            rows.append((pair, width, budget, init, tokens, tokens * rate + offset,
                         None if dense is None else tokens * dense + offset, offset, ev))
    if not rows:
        return None
    schema = {"pair": pl.String, "width": pl.Int64, "budget": pl.Int64, "init": pl.String,
              "tokens": pl.Int64, "flops": pl.Float64, "flops_dense": pl.Float64,
              "stitch_flops": pl.Float64, "ev": pl.Float64}
    curves = pl.DataFrame(rows, schema=schema, orient="row")
    order = p.with_row_index("pair_order").select("pair", "pair_order")
    return (
        curves.unique(["pair", "width", "budget", "init", "tokens"], keep="last")
        .join(order, on="pair", how="left")
        .sort("pair_order", "width", "budget", "init", "tokens")
        .drop("pair_order")
    )


def first_crossings(curves: pl.DataFrame, thresholds: tuple[float, ...]) -> pl.DataFrame:
    """Per curve and threshold, its first checkpoint at or above the threshold (tokens, flops,
    flops_dense; null when never reached) and the tokens of the checkpoint before it, the last
    below (0 when the first checkpoint already reaches it: training starts at 0 tokens; the
    last checkpoint when it is never reached). No interpolation between checkpoints."""
    keys = ["pair", "width", "budget", "init"]
    rows = []
    for key, g in curves.group_by(keys, maintain_order=True):
        points = g.sort("tokens").select("tokens", "flops", "flops_dense", "ev").rows()
        for t in thresholds:
            i = next((i for i, pt in enumerate(points) if pt[3] >= t), None)
            if i is None:
                rows.append((*key, t, None, points[-1][0], None, None))
            else:
                below = points[i - 1][0] if i else (0 if points[i][0] > 0 else None)
                rows.append((*key, t, points[i][0], below, points[i][1], points[i][2]))
    schema = {"pair": pl.String, "width": pl.Int64, "budget": pl.Int64, "init": pl.String,
              "threshold": pl.Float64, "tokens": pl.Int64, "last below": pl.Int64,
              "FLOPs": pl.Float64, "FLOPs dense": pl.Float64}
    return pl.DataFrame(rows, schema=schema, orient="row")


def flops_to_threshold(curves: pl.DataFrame, thresholds: tuple[float, ...],
                       settings: dict[str, dict] | None = None) -> pl.DataFrame:
    """Per pair, width, budget and threshold: each init's first checkpoint at or above it (see
    `first_crossings`) in tokens and in both FLOPs accountings, the stitch's share, the saving
    in both, and the paper's saving where it reports one for this pair and threshold."""
    settings = settings or {}
    k = ["pair", "width", "budget", "threshold"]
    reached = first_crossings(curves, thresholds)

    def side(init: str) -> pl.DataFrame:
        cols = ["tokens", "last below", "FLOPs", "FLOPs dense"]
        return reached.filter(pl.col("init") == init).select(
            *k, *(pl.col(c).alias(f"{init} {c}") for c in cols))

    order = curves.select("pair", "width", "budget").unique(maintain_order=True).with_row_index("_o")
    stitch_cost = curves.filter(pl.col("init") == "stitch").group_by("pair", "width", "budget").agg(
        pl.col("stitch_flops").first().alias("of which stitch FLOPs"))

    def saving(col: str) -> pl.Expr:
        return 100 * (1 - pl.col(f"stitch {col}") / pl.col(f"scratch {col}"))

    def paper(pair: str, threshold: float) -> str | None:
        n = lookup(REFERENCE, "flops_saving_pct", settings.get(pair, {}))
        return f"{n['low']}-{n['high']}" if n and abs(n["threshold"] - threshold) < 1e-9 else None

    table = side("scratch").join(side("stitch"), on=k, how="full", coalesce=True)
    return (
        table.join(stitch_cost, on=["pair", "width", "budget"], how="left")
        .with_columns(saving("FLOPs").alias("saving %"), saving("FLOPs dense").alias("saving % dense"),
                      pl.Series("paper saving %", [paper(p, t) for p, t in table.select(
                          "pair", "threshold").iter_rows()], dtype=pl.String))
        .join(order, on=["pair", "width", "budget"], how="left")
        .sort("_o", "threshold")
        .drop("_o")
    )


def plot_curves(curves: pl.DataFrame, thresholds: tuple[float, ...], out: Path) -> None:
    """Explained variance against FLOPs per pair and width; a row of panels per accounting."""
    panels = curves.select("pair", "width").unique(maintain_order=True).rows()
    kinds = [(name, col) for name, col in ACCOUNTINGS.items() if curves[col].is_not_null().any()]
    fig, axes = plt.subplots(len(kinds), len(panels), figsize=(max(4.5, 3.6 * len(panels)),
                                                               3 * len(kinds)), squeeze=False)
    colors = {"scratch": "black", "stitch": "tab:blue"}
    budgets = sorted(curves["budget"].drop_nulls().unique().to_list())
    styles = ["-", "--", ":", "-."]  # by budget, so each run keeps one look in every panel
    for row, (name, col) in zip(axes, kinds):
        for ax, (pair, width) in zip(row, panels):
            sel = curves.filter((pl.col("pair") == pair) & (pl.col("width") == width) & (pl.col(col) > 0))
            for (init, budget), g in sel.group_by("init", "budget", maintain_order=True):
                style = styles[budgets.index(budget) % 4] if budget in budgets else "-"
                ax.plot(g[col], g["ev"], style, color=colors[init], marker="o", ms=2,
                        label=f"{init} {budget}")
            for t in thresholds:
                ax.axhline(t, color="grey", lw=0.6, ls=":")
            ax.set_xscale("log")
            ax.set_title(f"{pair}, width {width}: FLOPs {name}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
        row[0].set_ylabel("held-out explained variance")
    fig.supxlabel("training FLOPs (stitch included for the stitched init)")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def power_law(flops: np.ndarray, ev: np.ndarray) -> tuple[float | None, float | None, float | None]:
    """(A, beta, r2) of the least-squares line log FVU = log A - beta log C (FVU = 1 - ev);
    all None under two points."""
    if len(flops) < 2:
        return None, None, None
    x, y = np.log(flops), np.log(1 - ev)
    slope, intercept = np.polyfit(x, y, 1)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - (intercept + slope * x)) ** 2).sum())
    return float(np.exp(intercept)), float(-slope), (1 - ss_res / ss_tot if ss_tot > 0 else None)


def fit_points(g: pl.DataFrame, budget: int | None, col: str) -> pl.DataFrame:
    """A curve's points a fit reads: after its first 10% of tokens, EV < 1, FLOPs known."""
    total = budget if budget is not None else g["tokens"].max()
    return g.filter((pl.col("tokens") > FIT_SKIP_FRACTION * total) & (pl.col("ev") < 1)
                    & pl.col(col).is_not_null() & (pl.col(col) > 0))


def scaling_fit(curves: pl.DataFrame) -> pl.DataFrame:
    """Least squares of log FVU = log A - beta log C per training curve (after its first 10%)
    and FLOPs accounting."""
    rows = []
    for (pair, width, budget, init), g in curves.group_by(
        "pair", "width", "budget", "init", maintain_order=True
    ):
        for name, col in ACCOUNTINGS.items():
            pts = fit_points(g, budget, col)
            rows.append((pair, width, budget, init, name, pts.height,
                         *power_law(pts[col].to_numpy(), pts["ev"].to_numpy())))
    schema = {"pair": pl.String, "width": pl.Int64, "budget": pl.Int64, "init": pl.String,
              "FLOPs": pl.String, "points": pl.Int64, "A": pl.Float64, "beta": pl.Float64,
              "r2": pl.Float64}
    return pl.DataFrame(rows, schema=schema, orient="row")


def scaling_fit_model(curves: pl.DataFrame, settings: dict[str, dict]) -> pl.DataFrame:
    """One L(C) = A * C^-beta per pair (B's model and layer), init and FLOPs accounting over
    every width, as the paper fits it: the checkpoints of each width's largest budget (a
    shorter budget repeats the start of the same run), each after its first 10% of tokens;
    the paper's A and beta on the dense rows where B's model and layer are the paper's."""
    largest = curves.group_by("pair", "width", "init").agg(pl.col("budget").max())
    full = curves.join(largest, on=["pair", "width", "init", "budget"], how="semi")
    rows = []
    for (pair, init), g in full.group_by("pair", "init", maintain_order=True):
        setting = settings.get(pair, {})
        for name, col in ACCOUNTINGS.items():
            pts = pl.concat([fit_points(c, b, col) for (b, _), c in g.group_by("budget", "width")])
            paper = name == "dense"
            rows.append((pair, setting.get("model_b"), init, name,
                         ",".join(str(w) for w in sorted(pts["width"].unique())), pts.height,
                         *power_law(pts[col].to_numpy(), pts["ev"].to_numpy()),
                         paper_value(f"scaling_fit/{init}", setting, "A") if paper else None,
                         paper_value(f"scaling_fit/{init}", setting, "beta") if paper else None))
    schema = {"pair": pl.String, "model B": pl.String, "init": pl.String, "FLOPs": pl.String,
              "widths": pl.String, "points": pl.Int64, "A": pl.Float64, "beta": pl.Float64,
              "r2": pl.Float64, "paper A": pl.Float64, "paper beta": pl.Float64}
    return pl.DataFrame(rows, schema=schema, orient="row")


def describe(number: dict) -> str:
    """The settings a reference number was measured in, short: `pythia-70m-deduped L3 → ...`."""
    def one(setting: dict) -> str:
        short = {k: str(v).rsplit("/", 1)[-1] for k, v in setting.items()}
        a = f"{short.get('model_a', 'A')} L{short['layer_a']} → " if "layer_a" in short else ""
        return a + f"{short.get('model_b', 'B')} L{short.get('layer_b', '?')}"

    return "; ".join(one(s) for s in settings_of(number)) or "any pair"


def paper_table(settings: dict[str, dict], tables: dict[str, pl.DataFrame | None]) -> pl.DataFrame:
    """Every reference number beside this sweep's figure for it, per pair (and width, budget):
    the stitch CEs, the FVUs of A's SAE and of its zero-shot transfer, the dense FLOPs saving at
    the paper's threshold (largest budget), the per-model L(C) fits (dense C)."""
    rows = []

    def add(name: str, field: str, label: str, pair: str, width: int | None, budget: int | None,
            value: float | None) -> None:
        number = next(n for n in REFERENCE["numbers"] if n["name"] == name)
        paper = f"{number['low']}-{number['high']}" if field == "range" else f"{number[field]:g}"
        same = lookup(REFERENCE, name, settings.get(pair, {})) is not None
        rows.append((label, pair, width, budget, value, paper, "yes" if same else "no",
                     describe(number), number["source"]))

    ce = tables.get("stitch_ce")
    for row in ce.iter_rows(named=True) if ce is not None else []:
        for name, col in (("ce/a", "CE A"), ("ce/b", "CE B"), ("ce/a_to_b", "A→B"), ("ce/b_to_a", "B→A")):
            add(name, "value", name, row["pair"], None, None, row[col])
    sae = tables.get("sae_transfer")
    for row in sae.iter_rows(named=True) if sae is not None else []:
        add("fvu/a", "value", "fvu/a", row["pair"], row["width"], None, row["A FVU"])
        add("fvu/zeroshot", "value", "fvu/zeroshot", row["pair"], row["width"], None, row["zero-shot FVU"])
    flops = tables.get("flops_to_threshold")
    saving = next(n for n in REFERENCE["numbers"] if n["name"] == "flops_saving_pct")
    if flops is not None:
        at = flops.filter((pl.col("threshold") - saving["threshold"]).abs() < 1e-9)
        at = at.join(at.group_by("pair", "width").agg(pl.col("budget").max()),
                     on=["pair", "width", "budget"], how="semi")
        for row in at.iter_rows(named=True):
            add("flops_saving_pct", "range", f"saving % dense at EV {saving['threshold']:g}",
                row["pair"], row["width"], row["budget"], row["saving % dense"])
    fits = tables.get("scaling_fit_model")
    for row in fits.filter(pl.col("FLOPs") == "dense").iter_rows(named=True) if fits is not None else []:
        for field in ("A", "beta"):
            add(f"scaling_fit/{row['init']}", field, f"L(C) {field}, {row['init']}", row["pair"],
                None, None, row[field])
    schema = {"quantity": pl.String, "pair": pl.String, "width": pl.Int64, "budget": pl.Int64,
              "raysae": pl.Float64, "paper": pl.String, "same setting": pl.String,
              "paper setting": pl.String, "source": pl.String}
    return pl.DataFrame(rows, schema=schema, orient="row")


def probe_tables(runs: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """probes (wide), sparse_probes (a row per label, width and k) and steering, per pair."""
    pr = role(runs, "probes")
    if pr.height == 0:
        return {}
    cols = [c for c in pr.columns if c.startswith("metrics.")]
    long = pr.select("pair", "layer_a", "layer_b", *cols).unpivot(
        on=cols, index=["pair", "layer_a", "layer_b"], variable_name="key", value_name="value"
    ).filter(pl.col("value").is_not_null()).with_columns(pl.col("key").str.strip_prefix("metrics."))
    out = {}
    dense = long.with_columns(pl.col("key").str.extract_groups(r"^probe/(.+)/([^/]+)$").alias("m")).filter(
        pl.col("m").struct.field("1").is_not_null())
    if dense.height:
        dense = dense.select("pair", "layer_a", "layer_b", pl.col("m").struct.field("1").alias("label"),
                             pl.col("m").struct.field("2").alias("kind"), "value")
        wide = dense.pivot(on="kind", index=["pair", "layer_a", "layer_b", "label"], values="value")
        kinds = [k for k in ("a_on_a", "a_on_b", "b_on_b", "random", "majority") if k in wide.columns]
        kinds += sorted(set(wide.columns) - {"pair", "layer_a", "layer_b", "label", *kinds})
        out["probes"] = wide.sort("layer_a", "layer_b", "label").select("pair", "label", *kinds)
    sparse = long.with_columns(
        pl.col("key").str.extract_groups(r"^sparse_probe/(.+)/w(\d+)/k(\d+)/([^/]+)$").alias("m")
    ).filter(pl.col("m").struct.field("1").is_not_null())
    if sparse.height:
        sparse = sparse.select(
            "pair", "layer_a", "layer_b", pl.col("m").struct.field("1").alias("label"),
            pl.col("m").struct.field("2").cast(pl.Int64).alias("width"),
            pl.col("m").struct.field("3").cast(pl.Int64).alias("k"),
            pl.col("m").struct.field("4").alias("kind"), "value")
        wide = sparse.pivot(on="kind", index=["pair", "layer_a", "layer_b", "label", "width", "k"],
                            values="value")
        kinds = [k for k in ("a_on_a", "a_on_b", "b_on_b") if k in wide.columns]
        out["sparse_probes"] = wide.sort("layer_a", "layer_b", "label", "width", "k").select(
            "pair", "label", "width", "k", *kinds)
    steer = long.filter(pl.col("key").str.starts_with("steering/"))
    if steer.height:
        cosine = steer.filter(pl.col("key") == "steering/cosine_a_mapped_b_own").select(
            "pair", pl.lit("a_mapped").alias("vector"), pl.col("value").alias("cosine to b_own"))
        parts = steer.with_columns(pl.col("key").str.extract_groups(r"^steering/([^/]+)/([^/]+)$").alias("m"))
        parts = parts.filter(pl.col("m").struct.field("1").is_not_null()).select(
            "pair", "layer_a", "layer_b", pl.col("m").struct.field("1").alias("vector"),
            pl.col("m").struct.field("2").alias("quantity"), "value")
        table = parts.pivot(on="quantity", index=["pair", "layer_a", "layer_b", "vector"], values="value")
        table = table.with_columns(*(pl.lit(None, dtype=pl.Float64).alias(q)
                                     for q in ("success", "strength") if q not in table.columns))
        vectors = {"b_own": 0, "a_mapped": 1, "random": 2, "unsteered": 3}
        out["steering"] = (
            table.join(cosine, on=["pair", "vector"], how="left")
            .sort("layer_a", "layer_b", pl.col("vector").replace_strict(vectors, default=4))
            .select("pair", "vector", "success", "strength", "cosine to b_own")
        )
    return out


def feature_classes(client: MlflowClient, runs: pl.DataFrame) -> pl.DataFrame | None:
    """Every probes run's features/w{width}.parquet, with its pair and width."""
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for run_id, pair in role(runs, "probes").sort("layer_a", "layer_b").select("run_id", "pair").iter_rows():
            for art in client.list_artifacts(run_id, "features"):
                name = Path(art.path).name
                if art.is_dir or not (name.startswith("w") and name.endswith(".parquet")):
                    continue
                path = client.download_artifacts(run_id, art.path, tmp)
                frames.append(pl.read_parquet(path).with_columns(
                    pl.lit(pair).alias("pair"), pl.lit(int(name[1:-len(".parquet")])).alias("width")))
    return pl.concat(frames, how="diagonal_relaxed") if frames else None


def feature_summary(features: pl.DataFrame) -> pl.DataFrame:
    finite = pl.col("quality").filter(pl.col("quality").is_not_null() & pl.col("quality").is_finite())
    order = features.select("pair").unique(maintain_order=True).with_row_index("_o")
    return (
        features.group_by("pair", "width", "class", maintain_order=True)
        .agg(pl.len().alias("count"), finite.mean().alias("mean quality"),
             finite.median().alias("median quality"))
        .join(order, on="pair", how="left")
        .sort("_o", "width", pl.col("class").replace_strict(CLASS_ORDER, default=3))
        .drop("_o")
    )


def plot_feature_classes(features: pl.DataFrame, out: Path) -> None:
    panels = features.select("pair", "width").unique(maintain_order=True).rows()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.5, 3.6 * len(panels)), 3),
                             squeeze=False)
    colors = {"structural": "tab:blue", "semantic": "tab:orange"}
    for ax, (pair, width) in zip(axes[0], panels):
        sel = features.filter((pl.col("pair") == pair) & (pl.col("width") == width)
                              & pl.col("quality").is_finite())
        values = sel["quality"].to_numpy()
        bins = np.linspace(values.min(), values.max(), 21) if len(values) else 20
        for cls, color in colors.items():
            q = sel.filter(pl.col("class") == cls)["quality"].to_numpy()
            if len(q):
                ax.hist(q, bins=bins, alpha=0.6, color=color, label=f"{cls} ({len(q)})")
        ax.set_title(f"{pair}, width {width}", fontsize=9)
        ax.set_xlabel("transfer quality (A/B attribution corr.)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("features")
    fig.tight_layout()
    fig.savefig(out / "feature_classes.png", dpi=110)
    plt.close(fig)


def layer_match(client: MlflowClient, runs: pl.DataFrame, out: Path) -> pl.DataFrame | None:
    parent = role(runs, "stitch_sweep")
    if parent.height == 0:
        return None
    run_id = parent["run_id"][0]
    if "layer_match.json" not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        m = json.loads(Path(client.download_artifacts(run_id, "layer_match.json", tmp)).read_text())
    values = np.asarray(m["matrix"], dtype=float)
    best = {int(k): int(v) for k, v in m.get("best", {}).items()}
    table = pl.DataFrame({"A layer": m["layers_a"]}).with_columns(
        *(pl.Series(f"B{lb}", values[:, j]) for j, lb in enumerate(m["layers_b"])),
        pl.Series("best B layer", [best.get(la) for la in m["layers_a"]], dtype=pl.Int64),
    )
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * values.shape[1], 1.2 + 0.4 * values.shape[0]))
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(m["layers_b"])), m["layers_b"])
    ax.set_yticks(range(len(m["layers_a"])), m["layers_a"])
    for i, la in enumerate(m["layers_a"]):
        if la in best and best[la] in m["layers_b"]:
            ax.plot(m["layers_b"].index(best[la]), i, "rx")
    ax.set_xlabel("layer of B")
    ax.set_ylabel("layer of A")
    ax.set_title(f"layer match ({m.get('method', '?')}); x = best")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "layer_match.png", dpi=120)
    plt.close(fig)
    return table


SAE_ROLES = {"scratch_a": "A", "zeroshot": "B zero-shot", "transfer": "B stitched init",
             "scratch_b": "B scratch"}


def circuits(runs: pl.DataFrame) -> pl.DataFrame | None:
    """Per SAE, the feature phase's means over tasks (`circuit/mean/...`), further averaged over
    the circuit sizes N its width gives; None without a feature phase."""
    def cols(kind: str) -> list[str]:
        return [c for c in runs.columns if re.fullmatch(rf"metrics\.circuit/mean/{kind}/n\d+", c)]

    if not cols("faithfulness"):
        return None
    order = {r: i for i, r in enumerate(SAE_ROLES)}
    return (
        runs.filter(pl.col("role").is_in(list(SAE_ROLES)))
        .sort(pl.col("width"), pl.col("role").replace_strict(order), pl.col("budget"))
        .select(
            pl.col("layer_a").alias("layer A"), pl.col("layer_b").alias("layer B"), "width",
            pl.col("role").replace_strict(SAE_ROLES).alias("SAE"), "budget",
            pl.mean_horizontal(cols("faithfulness")).alias("faithfulness"),
            pl.mean_horizontal(cols("completeness")).alias("completeness"),
            metric(runs, "dla/mean/total").alias("DLA"),
            metric(runs, "circuit/mean/atp_exact_corr").alias("AtP vs exact r"),
        )
    )


def main(argv: list[str] | None = None) -> int:
    args = report_args(__doc__, argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keeps stdout tables
    mlflow.set_tracking_uri(tracking_uri(args))
    client = MlflowClient()
    out = Path(args.out or Path(args.runs_dir) / "analysis") / args.experiment
    out.mkdir(parents=True, exist_ok=True)

    runs = load_runs(args.experiment)
    thresholds = sweep_thresholds(runs)
    settings = sweep_settings(runs)
    tables: dict[str, pl.DataFrame | None] = {}

    def emit(name: str, title: str, df: pl.DataFrame | None, missing: str) -> None:
        tables[name] = df
        if df is None or df.height == 0:
            print(f"note: {missing}; skipping {name}")
        else:
            write_table(df, out, name, title)

    emit("stitch_ce", "stitch CE in nats (Table 1)", stitch_ce(runs, settings), "no stitch runs")
    emit("sae_transfer", "SAE transfer (Table 2)", sae_transfer(runs, settings),
         "no zeroshot or transfer runs")
    curves = ev_curves(client, runs)
    if curves is None:
        print("note: no checkpoint evaluations of B's SAEs; skipping flops_to_threshold and "
              "scaling_fit")
    else:
        emit("flops_to_threshold", "FLOPs to reach held-out explained variance (as run and dense)",
             flops_to_threshold(curves, thresholds, settings), "")
        plot_curves(curves, thresholds, out)
        emit("scaling_fit", "FVU = A * FLOPs^-beta per curve", scaling_fit(curves), "")
        emit("scaling_fit_model", "FVU = A * FLOPs^-beta per pair and init, all widths",
             scaling_fit_model(curves, settings), "")
    emit("paper", "beside the stitching paper", paper_table(settings, tables),
         "nothing of this sweep the paper reports")
    probes = probe_tables(runs)
    for name in ("probes", "sparse_probes", "steering"):
        emit(name, name.replace("_", " "), probes.get(name), "no probes runs with these metrics")
    features = feature_classes(client, runs)
    if features is None:
        print("note: no features/w*.parquet artifacts; skipping feature_classes")
    else:
        emit("feature_classes", "feature classes: transfer quality", feature_summary(features), "")
        plot_feature_classes(features, out)
    emit("layer_match", "layer match", layer_match(client, runs, out), "no layer_match.json artifact")
    emit("circuits", "task circuits (means over tasks and N)", circuits(runs),
         "no circuit metrics (no features section)")

    if not args.no_log:
        exp = client.get_experiment_by_name(args.experiment)
        found = client.search_runs([exp.experiment_id], "tags.`raysae.role` = 'stitch_summary'")
        run_id = found[0].info.run_id if found else client.create_run(
            exp.experiment_id, run_name=f"{args.experiment} stitch summary",
            tags={"raysae.role": "stitch_summary"},
        ).info.run_id
        client.log_artifacts(run_id, str(out), "analysis")
        client.set_terminated(run_id)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
