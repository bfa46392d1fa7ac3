"""Tables and figures of a layer-transfer sweep, from its MLflow runs only (polars + matplotlib).

    python analysis/sweep_report.py EXPERIMENT [--runs-dir runs] [--out DIR] [--no-log]

Writes to `<out>/<experiment>/` (default out: <runs-dir>/analysis):
- zeroshot_ces.csv/.md/.png  the CES of SAE_j on layer i for every pair (the paper's Figure 2)
- normalized_ces_fwd.csv/.md, normalized_ces_bwd.csv/.md  per layer and checkpoint (Tables 3, 4),
  with the paper's values beside them: "paper @100M" ... after each checkpoint of a 500M run
  that is the paper's, else the paper's final "paper @500M"
- curves.png  CES, L2 and L0 over tokens per layer: scratch, forward, backward (Figures 3, 9-17)
- similarity.csv/.md  MMCS with the scratch SAE and transfer scores per transfer run: top
  logits, bottom logits, max-activating and the three combined (Figs 5, 6)
- compute.md  tokens of each Appendix B.1 plan (forward, backward) against scratch on every
  layer, and the quality each reaches (each plan transfer read at the plan's budget)
- early_stopping.csv/.md, early_stopping_by_budget.csv  with `sweep.stop_at`, from the transfer
  runs: per run its fixed budget, the tokens it used and saved, why it stopped and its normalized
  CES there; per direction and budget the tokens used against the fixed ones; the check that
  every `target:` stop is at the target (the report fails, naming the run, where one is not);
  and the cheapest plan for the target against the B.1 plans (from the sweep's summary)
- paper.csv/.md  every number of the paper (raysae/reference/layer_transfer.json) beside this
  sweep's figure for it, with whether the sweep's setting is the paper's
- with a feature phase (`features:` in the config): circuits_by_checkpoint,
  circuits_by_direction, circuits_by_n, circuits_by_task, dla_by_layer (.csv/.md) and
  circuits.png (see feature_tables.py)
With `sweep.architectures` each architecture gets these in `<out>/<experiment>/<architecture>/`,
and architectures.csv/.md puts them side by side (scratch CES, EV, L0; per direction and budget
the transferred SAEs' normalized CES, MMCS with scratch and combined transfer score). All are
logged as artifacts of a `<experiment> summary` run (unless --no-log). Reads nothing but
MLflow and the paper's numbers: the tracking URI is --tracking-uri (the job's tracking_uri), else MLFLOW_TRACKING_URI, else sqlite under the
runs directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import polars as pl  # noqa: E402
from common import report_args, to_markdown, tracking_uri  # noqa: E402
from feature_tables import feature_tables  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from raysae.reference import DIRECTION_LABELS  # noqa: E402  (data only, no training code)
from raysae.reference import load as load_reference  # noqa: E402

TAG = "tags.raysae."
REFERENCE = load_reference("layer_transfer")
PAPER_CHECKPOINT_SLACK = 1e-3
"""A logged checkpoint at t tokens is the paper's checkpoint c when c <= t <= c (1 + slack): the
loop checkpoints at the first batch at or after each multiple (100,003,840 for 100M)."""
STOP_SLACK = 1e-9
"""A `target:` stop passes the check at normalized CES >= target - slack: the rule's CES threshold
and the normalized CES derived after the sweep are the same inequality, up to rounding."""



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


def paper_numbers(name: str) -> list[dict]:
    return [n for n in REFERENCE["numbers"] if n["name"] == name]


def paper_checkpoint(tokens: int, budget: int, setting: dict) -> int | None:
    """The paper's checkpoint that a sweep's checkpoint at `tokens` of a `budget`-token
    fine-tuning is: its budget the paper's (500M) and tokens at or just after the checkpoint."""
    for c in sorted({n["at"]["checkpoint"] for n in paper_numbers("normalized_ces")}):
        if budget == setting.get("finetune_budget") and c <= tokens <= c * (1 + PAPER_CHECKPOINT_SLACK):
            return c
    return None


def paper_ces(direction: str, layer: int, checkpoint: int) -> float | None:
    for n in paper_numbers("normalized_ces"):
        if n["at"] == {"direction": direction, "layer": layer, "checkpoint": checkpoint}:
            return n["value"]
    return None


def sweep_parents(client: MlflowClient, experiment: str, architecture: str | None = None) -> list:
    """The experiment's sweep parent runs, newest first (of one architecture when given: a
    sweep with `sweep.architectures` has one parent per architecture)."""
    exp = client.get_experiment_by_name(experiment)
    query = "tags.`raysae.phase` = 'sweep'"
    if architecture is not None:
        query += f" and params.`sae.architecture` = '{architecture}'"
    return client.search_runs([exp.experiment_id], query)


def sweep_setting(client: MlflowClient, experiment: str, architecture: str | None = None) -> dict:
    """The sweep's side of the paper's settings (model, site, expansion factor, the paper's
    fine-tuning budget if the sweep has it, number of layers), from its parent run's params."""
    parents = sweep_parents(client, experiment, architecture)
    params = parents[0].data.params if parents else {}
    paper = paper_numbers("normalized_ces")[0]["setting"]
    budgets = json.loads(params.get("sweep.finetune_budgets", "[]"))
    layers = json.loads(params.get("sweep.layers", "[]"))
    expansion = params.get("sae.expansion_factor") if params.get("sae.d_sae") in (None, "None") else None
    return {
        "model": params.get("model.name"),
        "site": params.get("sweep.site"),
        "expansion_factor": int(expansion) if expansion is not None else None,
        "finetune_budget": paper["finetune_budget"] if paper["finetune_budget"] in budgets else None,
        "n_layers": len(layers),
    }


def stop_target(client: MlflowClient, experiment: str, architecture: str | None = None
                ) -> float | None:
    """The sweep's `sweep.stop_at.normalized_ces` (a param of its parent run), None without one
    (no `stop_at`, or a target other than normalized CES)."""
    parents = sweep_parents(client, experiment, architecture)
    value = parents[0].data.params.get("sweep.stop_at.normalized_ces") if parents else None
    return None if value in (None, "None") else float(value)


def same_setting(number: dict, setting: dict) -> bool:
    return all(setting.get(k) == v for k, v in number.get("setting", {}).items())


def normalized_tables(hist: pl.DataFrame, out: Path, setting: dict) -> dict[str, pl.DataFrame]:
    """Tables 3 and 4: normalized CES, a row per target layer, a column per checkpoint, and the
    paper's value beside each checkpoint that is the paper's (`paper_checkpoint`); where none
    is, the paper's final value (500M) after the last column, for the same table shape."""
    tables = {}
    for direction in DIRECTION_LABELS.values():  # as the runs are tagged
        h = hist.filter(
            (pl.col("metric") == "normalized_ces")
            & (pl.col("phase") == "transfer")
            & (pl.col("direction") == direction)
        )
        if h.height == 0:
            continue
        h = h.with_columns(pl.format("{} @{}", pl.col("budget"), pl.col("tokens")).alias("ckpt"))
        table = (
            h.sort("budget", "tokens")
            .pivot(on="ckpt", index="layer", values="value")
            .sort("layer")
        )
        ckpts = h.select("ckpt", pl.col("budget").cast(pl.Int64), "tokens").unique("ckpt")
        matched = {ckpt: paper_checkpoint(tokens, budget, setting)
                   for ckpt, budget, tokens in ckpts.iter_rows()}
        final = max(n["at"]["checkpoint"] for n in paper_numbers("normalized_ces"))
        columns, extra = ["layer"], []
        for ckpt in table.columns[1:]:
            columns.append(ckpt)
            if matched[ckpt] is not None:
                columns.append(f"paper @{matched[ckpt] // 1_000_000}M")
                extra.append((columns[-1], matched[ckpt]))
        if not extra:
            columns.append(f"paper @{final // 1_000_000}M")
            extra.append((columns[-1], final))
        table = table.with_columns(
            pl.Series(name, [paper_ces(direction, layer, c) for layer in table["layer"]],
                      dtype=pl.Float64)
            for name, c in extra
        ).select(columns)
        write_table(table, out, f"normalized_ces_{direction}")
        tables[direction] = table
    return tables


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
        "metrics.transfer_score/combined": "combined score",
    }
    present = {k: v for k, v in cols.items() if k in runs.columns}
    t = runs.filter(pl.col("phase").is_in(["transfer", "plan"])).select(
        pl.col("tags.mlflow.runName").alias("run"), "layer", "source_layer", "direction",
        pl.col("budget").cast(pl.Int64), *[pl.col(k).alias(v) for k, v in present.items()],
    ).sort("layer", "direction", "budget")
    parts = ["top-logit score", "bottom-logit score", "max-activating score"]
    if all(p in t.columns for p in parts):
        # runs derived before the combined score was logged: the mean of the three parts (each
        # part compares the same number of tokens per feature: Figure 6's combined share)
        mean_parts = pl.mean_horizontal(*parts)
        t = t.with_columns(
            (pl.col("combined score").fill_null(mean_parts) if "combined score" in t.columns
             else mean_parts).alias("combined score"))
    write_table(t, out, "similarity")


def sweep_summary(client: MlflowClient, experiment: str, architecture: str | None = None
                  ) -> dict | None:
    """The parent run's `sweep_summary.json`, its plans in the per-direction form (a summary
    written before the backward plan existed holds one forward plan in flat keys)."""
    parents = sweep_parents(client, experiment, architecture)
    if not parents:
        return None
    path = client.download_artifacts(parents[0].info.run_id, "sweep_summary.json")
    s = json.loads(Path(path).read_text())
    if "plans" not in s:
        s["plans"] = [{"direction": "forward", "scratch_layers": s["plan_scratch_layers"],
                       "transfers": s["plan_transfers"], "tokens": s["plan_tokens"],
                       "saved_fraction": s["saved_fraction"],
                       "members": [{"key": k, "tokens": None} for k in s["plan_trial_keys"]]}]
    return s


def value_at(client: MlflowClient, run_id: str, key: str, tokens: int | None) -> float | None:
    """A run's metric at the first step at or after `tokens` (its last value for None): a plan
    transfer read at the checkpoint of a longer fine-tuning."""
    hist = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))
    if tokens is not None:
        hist = [h for h in hist if h[0] >= tokens]
        hist = [h for h in hist if h[0] == hist[0][0]] if hist else []
    return hist[-1][2] if hist else None


def compute_summary(client: MlflowClient, s: dict | None, runs: pl.DataFrame, out: Path) -> None:
    """Each Appendix B.1 plan against scratch everywhere, at the quality each reaches: every
    member read at its tokens (a scratch SAE at its budget, a plan transfer at the plan's
    budget, of its own run or of a longer fine-tuning's checkpoint)."""
    if s is None:
        return
    run_of = dict(zip(runs["run_key"], runs["run_id"]))
    scratch = runs.filter(pl.col("phase") == "scratch")
    keys = ("eval/ces", "eval/explained_variance", "flops")

    def read(members: list[dict]) -> dict[str, list[float]]:
        got: dict[str, list[float]] = {k: [] for k in keys}
        for m in members:
            if m["key"] not in run_of:
                continue
            for k in keys:
                v = value_at(client, run_of[m["key"]], k, m["tokens"])
                if v is not None:
                    got[k].append(v)
        return got

    def row(label: str, tokens: int, got: dict[str, list[float]]) -> str:
        mean = {k: sum(v) / len(v) if v else float("nan") for k, v in got.items()}
        return (f"| {label} | {tokens:,} | {sum(got['flops']):.3g} | {mean['eval/ces']:.3f} | "
                f"{mean['eval/explained_variance']:.3f} |")

    everywhere = read([{"key": k, "tokens": None} for k in scratch["run_key"]])
    flops_all = sum(everywhere["flops"])
    lines = ["| setting | training tokens | training FLOPs | mean CES | mean explained variance |",
             "|---|---|---|---|---|", row("scratch on every layer", s["scratch_everywhere_tokens"],
                                         everywhere)]
    savings = []
    for plan in s["plans"]:
        got = read(plan["members"])
        sources = sorted({m.get("from", "run") for m in plan["members"] if m.get("from") != "scratch"})
        lines.append(row(f"{plan['direction']} plan: scratch on layers {plan['scratch_layers']}, "
                         f"transfer to the rest ({' and '.join(sources) or 'run'})",
                         plan["tokens"], got))
        flops = sum(got["flops"])
        savings.append(f"tokens saved by the {plan['direction']} plan: {plan['saved_fraction']:.1%}; "
                       f"FLOPs saved: {1 - flops / flops_all if flops_all else float('nan'):.1%}")
    lines += ["", *savings, "",
              "FLOPs counted with torch's FlopCounterMode per training step (evaluation not "
              "included), each member's up to the tokens it is read at; 'checkpoint': the plan "
              "transfer is the checkpoint at the plan's budget of a longer fine-tuning (the "
              "paper's 10% point), 'run': a run of the plan's budget."]
    (out / "compute.md").write_text("\n".join(lines) + "\n")


def paper_table(hist: pl.DataFrame, s: dict | None, setting: dict) -> pl.DataFrame:
    """Every number of the paper beside this sweep's figure for it: normalized CES per
    direction and layer at each of the paper's checkpoints that the sweep has (`paper_checkpoint`)
    and, at the paper's final 500M, the sweep's final one otherwise (largest budget); the plans'
    token savings; Section 4.4's step savings against each plan's."""
    rows = []
    nces = hist.filter(pl.col("metric") == "normalized_ces", pl.col("phase") == "transfer")
    nces = nces.with_columns(pl.col("budget").cast(pl.Int64))
    final = max(n["at"]["checkpoint"] for n in paper_numbers("normalized_ces"))
    for n in paper_numbers("normalized_ces"):
        at = n["at"]
        mine = nces.filter(pl.col("direction") == at["direction"], pl.col("layer") == at["layer"])
        exact = [r for r in mine.iter_rows(named=True)
                 if paper_checkpoint(r["tokens"], r["budget"], setting) == at["checkpoint"]]
        if exact:
            r, same = exact[-1], same_setting(n, setting)
        elif at["checkpoint"] == final and mine.height:
            r = mine.sort("budget", "tokens").tail(1).row(0, named=True)
            same = False
        else:
            continue
        rows.append(("normalized CES", at["direction"], at["layer"], f"{at['checkpoint'] // 10**6}M",
                     r["value"], f"{r['budget']} @{r['tokens']}", n["value"],
                     "yes" if same else "no", n["source"]))
    plans = (s or {}).get("plans", [])
    fraction = (s or {}).get("plan_budget_fraction")
    for n in paper_numbers("plan_tokens_saved"):
        for plan in plans:
            here = fraction is not None and abs(fraction - n["at"]["fraction"]) < 1e-9
            rows.append((f"plan tokens saved at {n['at']['fraction']:.0%}",
                         DIRECTION_LABELS[plan["direction"]], None, None,
                         plan["saved_fraction"] if here else None,
                         f"plan at {fraction:.0%}" if here else None, n["value"],
                         "yes" if here and same_setting(n, setting) else "no", n["source"]))
    for n in paper_numbers("steps_saved"):
        plan = next((p for p in plans if DIRECTION_LABELS[p["direction"]] == n["at"]["direction"]), None)
        rows.append(("training steps saved", n["at"]["direction"], None, None,
                     plan["saved_fraction"] if plan else None,
                     f"plan at {fraction:.0%}" if plan else None, n["value"],
                     "yes" if plan and same_setting(n, setting) else "no", n["source"]))
    schema = {"quantity": pl.String, "direction": pl.String, "layer": pl.Int64,
              "checkpoint": pl.String, "raysae": pl.Float64, "raysae at": pl.String,
              "paper": pl.Float64, "same setting": pl.String, "source": pl.String}
    return pl.DataFrame(rows, schema=schema, orient="row")


def report(client: MlflowClient, experiment: str, runs: pl.DataFrame, out: Path,
           architecture: str | None = None) -> list[str]:
    """Every table and figure of one sweep (one architecture's, when given) into `out`; returns
    the failures of the early-stopping check (`early_stopping`)."""
    out.mkdir(parents=True, exist_ok=True)
    trained = runs.filter(pl.col("phase").is_in(["scratch", "transfer", "plan"]))
    hist = histories(client, trained, ["eval/ces", "eval/l2", "eval/l0", "normalized_ces"])
    setting = sweep_setting(client, experiment, architecture)
    summary = sweep_summary(client, experiment, architecture)
    matrix = zeroshot_matrix(runs, out)
    normalized_tables(hist, out, setting)
    curves(hist, out)
    similarity(runs, out)
    compute_summary(client, summary, runs, out)
    stop_failures = early_stopping(summary, runs, hist,
                                   stop_target(client, experiment, architecture), out)
    write_table(paper_table(hist, summary, setting), out, "paper")
    has_features = feature_tables(client, trained, out)
    print("zero-shot CES (rows: evaluated on layer i, columns: SAE of layer j)")
    print(to_markdown(matrix))
    names = ["normalized_ces_fwd", "normalized_ces_bwd", "compute", "early_stopping", "paper"]
    if has_features:
        names += ["circuits_by_checkpoint", "circuits_by_direction", "circuits_by_n", "dla_by_layer"]
    for name in names:
        f = out / f"{name}.md"
        if f.exists():
            print(f"{name}:\n{f.read_text()}")
    return stop_failures


def stopped_transfers(runs: pl.DataFrame, hist: pl.DataFrame) -> pl.DataFrame | None:
    """One row per transfer run of a sweep with `sweep.stop_at` (None without): its fixed budget
    (the run's `train.num_tokens`), the tokens it trained (`raysae.tokens_seen`) and saved, the
    kind of its `raysae.stop` reason, and its normalized CES at the tokens it stopped at."""
    t = runs.filter(pl.col("phase") == "transfer")
    if "stop" not in t.columns or "tokens_seen" not in t.columns:
        return None
    budget = pl.col("budget").cast(pl.Int64, strict=False)
    if "params.train.num_tokens" in t.columns:
        budget = pl.coalesce(pl.col("params.train.num_tokens").cast(pl.Int64, strict=False), budget)
    nces = hist.filter(pl.col("metric") == "normalized_ces").select(
        "run_id", pl.col("tokens").cast(pl.Int64).alias("tokens used"),
        pl.col("value").cast(pl.Float64).alias("normalized CES at stop"))
    table = t.select(
        "run_id", pl.col("tags.mlflow.runName").alias("run"), "layer",
        pl.col("source_layer").alias("source layer"), "direction", budget.alias("budget"),
        pl.col("tokens_seen").cast(pl.Int64, strict=False).alias("tokens used"),
        pl.col("stop").str.extract(r"^(target|plateau|budget|no target): ").alias("stop"),
    ).with_columns((pl.col("budget") - pl.col("tokens used")).alias("tokens saved")).join(
        nces, on=["run_id", "tokens used"], how="left",
    ).select("run_id", "run", "layer", "source layer", "direction", "budget", "tokens used",
             "tokens saved", "stop", "normalized CES at stop"
    ).sort("direction", "budget", "layer")
    return table if table["stop"].is_not_null().any() else None


def stops_by_budget(table: pl.DataFrame) -> pl.DataFrame:
    """Per direction and fixed budget: the tokens the transfers used against their budgets."""
    return table.group_by("direction", "budget").agg(
        pl.len().alias("transfers"),
        (pl.col("tokens used") < pl.col("budget")).sum().alias("stopped early"),
        pl.col("tokens used").sum(),
        pl.col("budget").sum().alias("fixed budget tokens"),
    ).with_columns(
        (1 - pl.col("tokens used") / pl.col("fixed budget tokens")).alias("saved fraction")
    ).sort("direction", "budget")


def check_stops(table: pl.DataFrame, target: float) -> list[str]:
    """Why each run that stopped at the target (`target:`) is not at normalized CES >= target
    at its stop in MLflow (no value there fails too: the stop cannot be checked)."""
    hit = table.filter(pl.col("stop") == "target")
    bad = hit.filter(pl.col("normalized CES at stop").is_null()
                     | (pl.col("normalized CES at stop") < target - STOP_SLACK))

    def why(r: dict) -> str:
        value = r["normalized CES at stop"]
        found = "no normalized CES logged there" if value is None else f"normalized CES {value!r}"
        return (f"run {r['run']!r} ({r['run_id']}) stopped at the target at {r['tokens used']:,} "
                f"tokens with {found} < target {target:g}")

    return [why(r) for r in bad.iter_rows(named=True)]


def early_stopping(s: dict | None, runs: pl.DataFrame, hist: pl.DataFrame,
                   target: float | None, out: Path) -> list[str]:
    """`sweep.stop_at`, from the transfer runs in MLflow: per run the tokens it used against its
    fixed budget, why it stopped and its normalized CES there; the same per direction and
    budget; the check that every `target:` stop is at the target (`target`: the sweep's
    normalized CES target), and the cheapest plan for the target against the B.1 plans (from
    the sweep's summary). Returns the check's failures, for the caller to fail on once every
    table is written."""
    table = stopped_transfers(runs, hist)
    if table is None and (s is None or "early_stopping" not in s):
        return []
    lines, failures = [], []
    if s is not None and "early_stopping" in s:
        e = s["early_stopping"]
        lines += [f"{e['stopped_early']} of {e['transfers']} transfers stopped early: "
                  f"{e['tokens']:,} tokens of the {e['budget_tokens']:,} their fixed budgets would "
                  f"train ({e['saved_fraction']:.1%} saved).", ""]
    if table is not None:
        shown = table.drop("run_id")
        by_budget = stops_by_budget(table)
        shown.write_csv(out / "early_stopping.csv")
        by_budget.write_csv(out / "early_stopping_by_budget.csv")
        lines += [to_markdown(shown), to_markdown(by_budget)]
        if target is None:
            lines += ["early stopping check: no normalized CES target (`sweep.stop_at`), not checked", ""]
        else:
            failures = check_stops(table, target)
            n = table.filter(pl.col("stop") == "target").height
            held = (f"early stopping check: {n} transfers stopped at the target, each at "
                    f"normalized CES >= {target:g} (from MLflow)")
            lines += [f"early stopping check FAILED: {f}" for f in failures] if failures else [held]
            lines.append("")
    if s is not None and "budget_plan" in s:
        lines.append(s["budget_plan"])
    if s is not None and "budget_plan_run" in s:  # `sweep.run_budget_plan`
        lines += ["", s["budget_plan_run"]["text"]]
    (out / "early_stopping.md").write_text("\n".join(lines) + "\n")
    return failures


def architectures_table(runs: pl.DataFrame) -> pl.DataFrame:
    """The architectures side by side: their scratch SAEs (CES, explained variance, L0) and
    their transfers per direction and budget (normalized CES at the last checkpoint, MMCS with
    the scratch SAE of the layer, the combined transfer score), each a mean over layers."""
    def mean(col: str) -> pl.Expr:
        return (pl.col(col).mean() if col in runs.columns else pl.lit(None)).alias(col)

    scratch = runs.filter(pl.col("phase") == "scratch").group_by("architecture").agg(
        mean("metrics.eval/ces"), mean("metrics.eval/explained_variance"), mean("metrics.eval/l0"),
    ).rename({"metrics.eval/ces": "scratch CES", "metrics.eval/explained_variance": "scratch EV",
              "metrics.eval/l0": "scratch L0"})
    transfer = runs.filter(pl.col("phase") == "transfer").group_by(
        "architecture", "direction", pl.col("budget").cast(pl.Int64)).agg(
        mean("metrics.normalized_ces"), mean("metrics.mmcs_vs_scratch"),
        mean("metrics.transfer_score/combined"),
    ).rename({"metrics.normalized_ces": "normalized CES", "metrics.mmcs_vs_scratch": "MMCS",
              "metrics.transfer_score/combined": "combined score"})
    return transfer.join(scratch, on="architecture", how="left").sort(
        "direction", "budget", "architecture")


def main(argv: list[str] | None = None) -> int:
    args = report_args(__doc__, argv)
    mlflow.set_tracking_uri(tracking_uri(args))
    client = MlflowClient()
    out = Path(args.out or Path(args.runs_dir) / "analysis") / args.experiment
    out.mkdir(parents=True, exist_ok=True)

    runs = load_runs(args.experiment)
    archs = sorted(runs["architecture"].unique()) if "architecture" in runs.columns else []
    failures = []
    if len(archs) > 1:  # `sweep.architectures`: a report per architecture, and them side by side
        for arch in archs:
            print(f"== {arch} ==")
            failures += report(client, args.experiment,
                               runs.filter(pl.col("architecture") == arch), out / arch, arch)
        write_table(architectures_table(runs), out, "architectures")
        print(f"architectures:\n{(out / 'architectures.md').read_text()}")
    else:
        failures = report(client, args.experiment, runs, out)
    if not args.no_log:
        exp = client.get_experiment_by_name(args.experiment)
        found = client.search_runs([exp.experiment_id], "tags.`raysae.phase` = 'summary'")
        run_id = found[0].info.run_id if found else client.create_run(
            exp.experiment_id, run_name=f"{args.experiment} summary", tags={"raysae.phase": "summary"}
        ).info.run_id
        client.log_artifacts(run_id, str(out), "analysis")
        client.set_terminated(run_id)
    print(f"written to {out}")
    if failures:  # after every table is written and logged: what failed is there to read
        raise SystemExit("early stopping check failed:\n" + "\n".join(failures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
