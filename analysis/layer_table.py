"""Per-layer table of an experiment's SAE runs, read from MLflow into polars.

    python analysis/layer_table.py EXPERIMENT [--runs-dir runs] [--out runs/analysis]

Writes `<out>/<experiment>/layers.csv` and `layers.md` (CES, KL score, explained variance, L0,
dead fraction of each run's last checkpoint) and prints the markdown. The tracking URI is
--tracking-uri (the job's tracking_uri), else MLFLOW_TRACKING_URI, else the sqlite file under the
runs directory. Imports no
training code: only MLflow's run table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow
import polars as pl
from common import store_args, to_markdown, tracking_uri

COLUMNS = {
    "tags.raysae.layer": "layer",
    "tags.raysae.site": "site",
    "tags.raysae.init": "init",
    "metrics.eval/ces": "CES",
    "metrics.eval/kl_score": "KL score",
    "metrics.eval/explained_variance": "explained variance",
    "metrics.eval/l0": "L0",
    "metrics.eval/dead_fraction": "dead fraction",
    "metrics.tokens_seen": "tokens",
}



def load_runs(experiment: str, uri: str) -> pl.DataFrame:
    """Every finished run of the experiment, one row each (MLflow's flat run table)."""
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string="attributes.status = 'FINISHED'")
    if len(runs) == 0:
        raise SystemExit(f"no finished runs in experiment {experiment!r} at {uri}")
    return pl.from_pandas(runs.astype({c: str for c in runs.columns if c.startswith("tags.")}))


def layer_table(runs: pl.DataFrame) -> pl.DataFrame:
    """One row per run: the metrics of its last checkpoint, sorted by layer."""
    missing = [c for c in COLUMNS if c not in runs.columns]
    if missing:
        raise SystemExit(f"the runs lack {missing}: were they written by raysae?")
    return (
        runs.select([pl.col(c).alias(n) for c, n in COLUMNS.items()])
        .with_columns(pl.col("layer").cast(pl.Int64), pl.col("tokens").cast(pl.Int64))
        .sort("layer", "init")
    )



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment")
    store_args(p)
    p.add_argument("--out", default=None, help="output folder (default: <runs-dir>/analysis)")
    args = p.parse_args(argv)
    table = layer_table(load_runs(args.experiment, tracking_uri(args)))
    out = Path(args.out or Path(args.runs_dir) / "analysis") / args.experiment
    out.mkdir(parents=True, exist_ok=True)
    table.write_csv(out / "layers.csv")
    md = to_markdown(table)
    (out / "layers.md").write_text(md)
    print(md)
    print(f"written to {out}/layers.csv and layers.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
