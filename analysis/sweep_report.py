"""Tables and figures of a layer-transfer sweep, from its MLflow runs only (polars + matplotlib).

    python analysis/sweep_report.py EXPERIMENT [--runs-dir runs] [--out DIR] [--no-log]

Writes to `<out>/<experiment>/` (default out: <runs-dir>/analysis):
- zeroshot_ces.csv/.md/.png  the CES of SAE_j on layer i for every pair (the paper's Figure 2)
- normalized_ces_fwd.csv/.md, normalized_ces_bwd.csv/.md  per layer and checkpoint (Tables 3, 4)
- curves.png  CES, L2 and L0 over tokens per layer: scratch, forward, backward (Figures 3, 9-17)
- similarity.csv/.md  MMCS with the scratch SAE and transfer scores per transfer run (Figs 5, 6)
- compute.md  tokens of the Appendix B.1 plan against scratch on every layer, and the quality
  each reaches
- with a feature phase (`features:` in the config): circuits_by_checkpoint, circuits_by_n,
  circuits_by_task, dla_by_layer (.csv/.md) and circuits.png (see feature_tables.py)
and logs them as artifacts of a `<experiment> summary` run (unless --no-log). Reads nothing but
MLflow: the tracking URI is MLFLOW_TRACKING_URI, else sqlite under the runs directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import polars as pl  # noqa: E402
from common import to_markdown, tracking_uri  # noqa: E402
from feature_tables import feature_tables  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

TAG = "tags.raysae."



def load_runs(experiment: str) -> pl.DataFrame:
    runs = mlflow.search_runs(experiment_names=[experiment])
    if len(runs) == 0:
        raise SystemExit(f"no runs in experiment {experiment!r}")
    df = pl.from_pandas(runs.astype({c: str for c in runs.columns if c.startswith("tags.")}))
    df = df.rename({c: c.removeprefix(TAG) for c in df.columns if c.startswith(TAG)})
    return df.filter(pl.col("phase").is_in(["scratch", "zeroshot", "transfer", "plan"])).with_columns(
        pl.col("layer").cast(pl.Int64),
        pl.when(pl.col("source_layer") == "").then(None).otherwise(pl.col("source_layer"))
        .cast(pl.Int64).alias("source_layer"),
    )


def histories(client: MlflowClient, runs: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Long table: one row per (run, metric, step)."""
    rows = []
    for run_id, name, phase, direction, layer, budget in runs.select(
        "run_id", "tags.mlflow.runName", "phase", "direction", "layer", "budget"
    ).iter_rows():
        for key in keys:
            for m in client.get_metric_history(run_id, key):
                rows.append((run_id, name, phase, direction, layer, budget, key, m.step, m.value))
    schema = ["run_id", "name", "phase", "direction", "layer", "budget", "metric", "tokens", "value"]
    return pl.DataFrame(rows, schema=schema, orient="row").unique(
        ["run_id", "metric", "tokens"], keep="last"
    )



def write_table(df: pl.DataFrame, out: Path, name: str) -> None:
    df.write_csv(out / f"{name}.csv")
    (out / f"{name}.md").write_text(to_markdown(df))


def zeroshot_matrix(runs: pl.DataFrame, out: Path) -> pl.DataFrame:
    z = runs.filter(pl.col("phase") == "zeroshot").select(
        pl.col("layer").alias("eval layer i"), "source_layer", pl.col("metrics.eval/ces").alias("ces")
    )
    matrix = (
        z.sort("source_layer")
        .pivot(on="source_layer", index="eval layer i", values="ces")
        .sort("eval layer i")
    )
    matrix = matrix.rename({c: f"SAE_{c}" for c in matrix.columns if c != "eval layer i"})
    write_table(matrix, out, "zeroshot_ces")
    values = matrix.drop("eval layer i").to_numpy()
    fig, ax = plt.subplots(figsize=(1 + 0.6 * values.shape[1], 1 + 0.5 * values.shape[0]))
    im = ax.imshow(values, cmap="viridis", vmin=min(0.0, float(values.min())), vmax=1.0)
    ax.set_xticks(range(values.shape[1]), [c.removeprefix("SAE_") for c in matrix.columns[1:]])
    ax.set_yticks(range(values.shape[0]), matrix["eval layer i"].to_list())
    ax.set_xlabel("SAE trained on layer j")
    ax.set_ylabel("evaluated on layer i")
    ax.set_title("zero-shot CES")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "zeroshot_ces.png", dpi=120)
    plt.close(fig)
    return matrix


def normalized_tables(hist: pl.DataFrame, out: Path) -> None:
    """Tables 3 and 4: normalized CES, a row per target layer, a column per checkpoint."""
    for direction in ("fwd", "bwd"):
        h = hist.filter(
            (pl.col("metric") == "normalized_ces")
            & (pl.col("phase") == "transfer")
            & (pl.col("direction") == direction)
        )
        if h.height == 0:
            continue
        table = (
            h.with_columns(pl.format("{} @{}", pl.col("budget"), pl.col("tokens")).alias("ckpt"))
            .sort("budget", "tokens")
            .pivot(on="ckpt", index="layer", values="value")
            .sort("layer")
        )
        write_table(table, out, f"normalized_ces_{direction}")


def curves(hist: pl.DataFrame, out: Path) -> None:
    metrics = [("eval/ces", "CES"), ("eval/l2", "L2"), ("eval/l0", "L0")]
    layers = sorted(hist["layer"].unique().to_list())
    fig, axes = plt.subplots(len(metrics), len(layers), figsize=(3 * len(layers), 2.4 * len(metrics)),
                             squeeze=False)
    colors = {"scratch": "black", "fwd": "tab:blue", "bwd": "tab:red"}
    budgets = sorted({int(b) for b in hist["budget"].unique().to_list()})
    styles = ["-", "--", ":", "-."]  # by budget, so each run keeps one look in every panel
    for c, layer in enumerate(layers):
        for r, (key, label) in enumerate(metrics):
            ax = axes[r][c]
            sel = hist.filter(
                (pl.col("layer") == layer) & (pl.col("metric") == key)
                & pl.col("phase").is_in(["scratch", "transfer"])
            )
            for (name, direction, budget), g in sel.sort("name").group_by(
                "name", "direction", "budget", maintain_order=True
            ):
                g = g.sort("tokens")
                ax.plot(g["tokens"], g["value"], styles[budgets.index(int(budget)) % 4],
                        color=colors.get(direction, "tab:green"), marker="o", ms=3, label=name)
            ax.set_title(f"layer {layer}: {label}", fontsize=9)
            ax.tick_params(labelsize=7)
            if r == 0:
                ax.legend(fontsize=6)
    fig.supxlabel("tokens")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def similarity(runs: pl.DataFrame, out: Path) -> None:
    cols = {
        "metrics.mmcs_vs_scratch": "MMCS vs scratch",
        "metrics.transfer_score/top_logits": "top-logit score",
        "metrics.transfer_score/bottom_logits": "bottom-logit score",
        "metrics.transfer_score/max_activating": "max-activating score",
    }
    present = {k: v for k, v in cols.items() if k in runs.columns}
    t = runs.filter(pl.col("phase").is_in(["transfer", "plan"])).select(
        pl.col("tags.mlflow.runName").alias("run"), "layer", "source_layer", "direction",
        pl.col("budget").cast(pl.Int64), *[pl.col(k).alias(v) for k, v in present.items()],
    ).sort("layer", "direction", "budget")
    write_table(t, out, "similarity")


def compute_summary(client: MlflowClient, experiment: str, runs: pl.DataFrame, out: Path) -> None:
    """The Appendix B.1 plan against scratch everywhere, at the quality each reaches."""
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], "tags.`raysae.phase` = 'sweep'")
    if not parents:
        return
    path = client.download_artifacts(parents[0].info.run_id, "sweep_summary.json")
    s = json.loads(Path(path).read_text())
    by_key = {k: row for k, row in zip(runs["run_key"], runs.iter_rows(named=True))}
    plan = [by_key[k] for k in s["plan_trial_keys"] if k in by_key]
    scratch = runs.filter(pl.col("phase") == "scratch")

    def mean(rows: list[dict], key: str) -> float:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    def total(rows: list[dict], key: str) -> float:
        return sum(r[key] for r in rows if r.get(key) is not None)

    flops_all = total(scratch.to_dicts(), "metrics.flops")
    flops_plan = total(plan, "metrics.flops")
    lines = [
        "| setting | training tokens | training FLOPs | mean CES | mean explained variance |",
        "|---|---|---|---|---|",
        f"| scratch on every layer | {s['scratch_everywhere_tokens']:,} | {flops_all:.3g} | "
        f"{mean(scratch.to_dicts(), 'metrics.eval/ces'):.3f} | "
        f"{mean(scratch.to_dicts(), 'metrics.eval/explained_variance'):.3f} |",
        f"| plan: scratch on layers {s['plan_scratch_layers']}, transfer to the rest | "
        f"{s['plan_tokens']:,} | {flops_plan:.3g} | {mean(plan, 'metrics.eval/ces'):.3f} | "
        f"{mean(plan, 'metrics.eval/explained_variance'):.3f} |",
        "",
        f"tokens saved by the plan: {s['saved_fraction']:.1%}; FLOPs saved: "
        f"{1 - flops_plan / flops_all if flops_all else float('nan'):.1%} (counted with "
        "torch's FlopCounterMode per training step; evaluation not included)",
    ]
    (out / "compute.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--out", default=None)
    p.add_argument("--no-log", action="store_true", help="do not log a summary MLflow run")
    args = p.parse_args(argv)
    mlflow.set_tracking_uri(tracking_uri(args.runs_dir))
    client = MlflowClient()
    out = Path(args.out or Path(args.runs_dir) / "analysis") / args.experiment
    out.mkdir(parents=True, exist_ok=True)

    runs = load_runs(args.experiment)
    trained = runs.filter(pl.col("phase").is_in(["scratch", "transfer", "plan"]))
    hist = histories(client, trained, ["eval/ces", "eval/l2", "eval/l0", "normalized_ces"])
    matrix = zeroshot_matrix(runs, out)
    normalized_tables(hist, out)
    curves(hist, out)
    similarity(runs, out)
    compute_summary(client, args.experiment, runs, out)
    has_features = feature_tables(client, trained, out)
    print("zero-shot CES (rows: evaluated on layer i, columns: SAE of layer j)")
    print(to_markdown(matrix))
    names = ["normalized_ces_fwd", "normalized_ces_bwd", "compute"]
    if has_features:
        names += ["circuits_by_checkpoint", "circuits_by_n", "dla_by_layer"]
    for name in names:
        f = out / f"{name}.md"
        if f.exists():
            print(f"{name}:\n{f.read_text()}")
    if not args.no_log:
        exp = client.get_experiment_by_name(args.experiment)
        found = client.search_runs([exp.experiment_id], "tags.`raysae.phase` = 'summary'")
        run_id = found[0].info.run_id if found else client.create_run(
            exp.experiment_id, run_name=f"{args.experiment} summary", tags={"raysae.phase": "summary"}
        ).info.run_id
        client.log_artifacts(run_id, str(out), "analysis")
        client.set_terminated(run_id)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
