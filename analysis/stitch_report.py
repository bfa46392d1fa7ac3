"""Tables and figures of a model-stitching sweep, from its MLflow runs only (polars + matplotlib).

    python analysis/stitch_report.py EXPERIMENT [--runs-dir runs] [--out DIR] [--no-log]

Writes to `<out>/<experiment>/` (default out: <runs-dir>/analysis), each table as .csv and .md:
- stitch_ce           next-token CE of A, B, the two stitched models, the two round trips and
                      the least-squares baseline, with the maps' explained variances (Table 1)
- sae_transfer        A's SAE on A, carried zero-shot to B, and B's own SAEs (Table 2)
- flops_to_threshold  training FLOPs of B's SAE to first reach each explained variance of
                      `stitch.ev_thresholds`, from scratch and from the stitch (stitch FLOPs
                      included), and the saving; curves.png: explained variance against FLOPs
- scaling_fit         FVU = A * FLOPs^-beta fitted to each training curve
- probes, sparse_probes, steering   probes and steering vectors of A used on B through the stitch
- feature_classes     (+ .png) transfer quality of structural and semantic features
- layer_match         (+ .png) the layer-matching matrix, when the sweep computed one
- circuits            task circuits of every SAE (A's, B's zero-shot, stitched-init and scratch
                      ones): faithfulness and completeness averaged over tasks and circuit
                      sizes, direct logit attribution, the AtP check (with `features:`)
and logs them as artifacts of a `<experiment> stitch summary` run (unless --no-log). A piece
whose runs are missing is skipped with a note. Reads nothing but MLflow: the tracking URI is
MLFLOW_TRACKING_URI, else sqlite under the runs directory.
"""

from __future__ import annotations

import argparse
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
from common import to_markdown, tracking_uri  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

TAG = "tags.raysae."
ROLES = ("stitch_sweep", "stitch", "scratch_a", "scratch_b", "zeroshot", "transfer", "probes")
ROLE_KEYS = ["role", "pair", "layer_a", "layer_b", "width", "budget"]
DEFAULT_THRESHOLDS = (0.7, 0.8, 0.9)
FIT_SKIP_FRACTION = 0.1
"""The scaling fit ignores the first 10% of each run's tokens (the warm-up transient)."""
CURVE_METRIC = "train/explained_variance"
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
    """Full precision in the csv; in the markdown, FLOPs in 3 significant digits."""
    df.write_csv(out / f"{name}.csv")
    big = [c for c in df.columns if "FLOPs" in c and df.schema[c] == pl.Float64]
    md = to_markdown(df.with_columns(
        pl.col(c).map_elements(lambda v: f"{v:.3g}", return_dtype=pl.String) for c in big))
    (out / f"{name}.md").write_text(md)
    print(f"{title}:\n{md}")


def stitch_ce(runs: pl.DataFrame) -> pl.DataFrame | None:
    """Table 1: one row per pair, every value the stitch run's final one."""
    s = role(runs, "stitch")
    if s.height == 0:
        return None
    return s.sort("layer_a", "layer_b").select(
        "pair", pl.col("layer_a").alias("layer A"), pl.col("layer_b").alias("layer B"),
        *[metric(s, k).alias(v) for k, v in STITCH_COLUMNS.items()],
    )


def sae_transfer(runs: pl.DataFrame) -> pl.DataFrame | None:
    """Table 2: per pair and width, A's SAE on A, zero-shot on B, and B's SAEs at the largest
    budget (from scratch, and from the stitch for comparison)."""
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
    return (
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


def ev_curves(client: MlflowClient, runs: pl.DataFrame) -> pl.DataFrame | None:
    """Long table of B's SAE training curves: pair, width, budget, init, tokens, flops,
    stitch_flops, ev.

    FLOPs at a step = tokens x FLOPs per token (the run's flops / tokens_seen), plus the
    stitch's own training FLOPs for the stitched init (the transfer run's stitch_flops, else
    the stitch run's flops). A scratch run of B's layer appears once
    under each pair that stitches into that layer.
    """
    p = pairs(runs)
    stitch_flops = role(runs, "stitch").select("pair", metric(runs, "flops").alias("from_stitch"))
    trained = pl.concat([
        role(runs, "transfer").join(stitch_flops, on="pair", how="left").select(
            "run_id", "pair", "width", "budget", pl.lit("stitch").alias("init"),
            pl.coalesce(metric(runs, "stitch_flops"), pl.col("from_stitch")).alias("offset"),
            (metric(runs, "flops") / metric(runs, "tokens_seen")).alias("per_token")),
        role(runs, "scratch_b").drop("pair").join(p.select("pair", "layer_b"), on="layer_b").select(
            "run_id", "pair", "width", "budget", pl.lit("scratch").alias("init"),
            pl.lit(0.0).alias("offset"),
            (metric(runs, "flops") / metric(runs, "tokens_seen")).alias("per_token")),
    ])
    if trained.height == 0:
        return None
    missing = trained.filter(pl.col("offset").is_null())
    if missing.height:
        print(f"note: no stitch FLOPs for pairs {missing['pair'].unique().to_list()}; counted as 0")
    no_rate = trained.filter(pl.col("per_token").is_null())
    if no_rate.height:
        print(f"note: no flops/tokens_seen on runs {no_rate['run_id'].to_list()}; skipped")
    trained = trained.filter(pl.col("per_token").is_not_null()).with_columns(pl.col("offset").fill_null(0.0))
    history: dict[str, list[tuple[int, float]]] = {}
    rows = []
    for run_id, pair, width, budget, init, offset, per_token in trained.iter_rows():
        if run_id not in history:
            history[run_id] = [(m.step, m.value) for m in client.get_metric_history(run_id, CURVE_METRIC)]
        for step, value in history[run_id]:
            rows.append((pair, width, budget, init, step, step * per_token + offset, offset, value))
    if not rows:
        return None
    schema = {"pair": pl.String, "width": pl.Int64, "budget": pl.Int64, "init": pl.String,
              "tokens": pl.Int64, "flops": pl.Float64, "stitch_flops": pl.Float64, "ev": pl.Float64}
    curves = pl.DataFrame(rows, schema=schema, orient="row")
    order = p.with_row_index("pair_order").select("pair", "pair_order")
    return (
        curves.unique(["pair", "width", "budget", "init", "tokens"], keep="last")
        .join(order, on="pair", how="left")
        .sort("pair_order", "width", "budget", "init", "tokens")
        .drop("pair_order")
    )


def flops_to_threshold(curves: pl.DataFrame, thresholds: tuple[float, ...]) -> pl.DataFrame:
    """The first logged point at or above each threshold (no interpolation between points)."""
    keys = ["pair", "width", "budget", "init"]
    grid = curves.select(keys).unique(maintain_order=True).join(
        pl.DataFrame({"threshold": list(thresholds)}), how="cross")
    first = (
        curves.join(pl.DataFrame({"threshold": list(thresholds)}), how="cross")
        .filter(pl.col("ev") >= pl.col("threshold"))
        .group_by(*keys, "threshold")
        .agg(pl.col("tokens").min(), pl.col("flops").sort_by("tokens").first())
    )
    reached = grid.join(first, on=[*keys, "threshold"], how="left")

    def side(init: str, label: str) -> pl.DataFrame:
        return reached.filter(pl.col("init") == init).select(
            "pair", "width", "budget", "threshold",
            pl.col("tokens").alias(f"{label} tokens"), pl.col("flops").alias(f"{label} FLOPs"))

    order = curves.select("pair", "width", "budget").unique(maintain_order=True).with_row_index("_o")
    stitch_cost = curves.filter(pl.col("init") == "stitch").group_by("pair", "width", "budget").agg(
        pl.col("stitch_flops").first().alias("of which stitch FLOPs"))
    k = ["pair", "width", "budget", "threshold"]
    table = side("scratch", "scratch").join(side("stitch", "stitch"), on=k, how="full", coalesce=True)
    return (
        table.join(stitch_cost, on=["pair", "width", "budget"], how="left")
        .with_columns((100 * (1 - pl.col("stitch FLOPs") / pl.col("scratch FLOPs"))).alias("saving %"))
        .join(order, on=["pair", "width", "budget"], how="left")
        .sort("_o", "threshold")
        .drop("_o")
    )


def plot_curves(curves: pl.DataFrame, thresholds: tuple[float, ...], out: Path) -> None:
    panels = curves.select("pair", "width").unique(maintain_order=True).rows()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.5, 3.6 * len(panels)), 3),
                             squeeze=False)
    colors = {"scratch": "black", "stitch": "tab:blue"}
    budgets = sorted(curves["budget"].drop_nulls().unique().to_list())
    styles = ["-", "--", ":", "-."]  # by budget, so each run keeps one look in every panel
    for ax, (pair, width) in zip(axes[0], panels):
        sel = curves.filter((pl.col("pair") == pair) & (pl.col("width") == width) & (pl.col("flops") > 0))
        for (init, budget), g in sel.group_by("init", "budget", maintain_order=True):
            style = styles[budgets.index(budget) % 4] if budget in budgets else "-"
            ax.plot(g["flops"], g["ev"], style, color=colors[init], marker="o", ms=2,
                    label=f"{init} {budget}")
        for t in thresholds:
            ax.axhline(t, color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_title(f"{pair}, width {width}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("explained variance")
    fig.supxlabel("training FLOPs (stitch included for the stitched init)")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def scaling_fit(curves: pl.DataFrame) -> pl.DataFrame:
    """Least squares of log FVU = log A - beta log C per training curve, after its first 10%."""
    rows = []
    for (pair, width, budget, init), g in curves.group_by(
        "pair", "width", "budget", "init", maintain_order=True
    ):
        total = budget if budget is not None else g["tokens"].max()
        g = g.filter(
            (pl.col("tokens") > FIT_SKIP_FRACTION * total) & (pl.col("ev") < 1) & (pl.col("flops") > 0)
        )
        a = beta = r2 = None
        if g.height >= 2:
            x, y = np.log(g["flops"].to_numpy()), np.log(1 - g["ev"].to_numpy())
            slope, intercept = np.polyfit(x, y, 1)
            ss_tot = float(((y - y.mean()) ** 2).sum())
            ss_res = float(((y - (intercept + slope * x)) ** 2).sum())
            a, beta = float(np.exp(intercept)), float(-slope)
            r2 = 1 - ss_res / ss_tot if ss_tot > 0 else None
        rows.append((pair, width, budget, init, g.height, a, beta, r2))
    schema = {"pair": pl.String, "width": pl.Int64, "budget": pl.Int64, "init": pl.String,
              "points": pl.Int64, "A": pl.Float64, "beta": pl.Float64, "r2": pl.Float64}
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--out", default=None)
    p.add_argument("--no-log", action="store_true", help="do not log a summary MLflow run")
    args = p.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keeps stdout tables
    mlflow.set_tracking_uri(tracking_uri(args.runs_dir))
    client = MlflowClient()
    out = Path(args.out or Path(args.runs_dir) / "analysis") / args.experiment
    out.mkdir(parents=True, exist_ok=True)

    runs = load_runs(args.experiment)
    thresholds = sweep_thresholds(runs)

    def emit(name: str, title: str, df: pl.DataFrame | None, missing: str) -> None:
        if df is None or df.height == 0:
            print(f"note: {missing}; skipping {name}")
        else:
            write_table(df, out, name, title)

    emit("stitch_ce", "stitch CE in nats (Table 1)", stitch_ce(runs), "no stitch runs")
    emit("sae_transfer", "SAE transfer (Table 2)", sae_transfer(runs), "no zeroshot or transfer runs")
    curves = ev_curves(client, runs)
    if curves is None:
        print("note: no training curves of B's SAEs; skipping flops_to_threshold and scaling_fit")
    else:
        emit("flops_to_threshold", "FLOPs to reach explained variance", flops_to_threshold(curves, thresholds), "")
        plot_curves(curves, thresholds, out)
        emit("scaling_fit", "FVU = A * FLOPs^-beta", scaling_fit(curves), "")
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
