"""Helpers shared by the analysis scripts (MLflow location, markdown tables); no training code."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import polars as pl


def tracking_uri(args: argparse.Namespace) -> str:
    """Where the runs are, as raysae decides it for a job: --tracking-uri (a job's
    `tracking_uri`), else MLFLOW_TRACKING_URI, else the sqlite store under --runs-dir."""
    return (args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{Path(args.runs_dir).resolve() / 'mlflow.db'}")


def store_args(p: argparse.ArgumentParser) -> None:
    """--runs-dir and --tracking-uri, which every script reads the runs with (`tracking_uri`)."""
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--tracking-uri", default=None,
                   help="the MLflow store of the runs (the job's tracking_uri; default: "
                        "MLFLOW_TRACKING_URI, else sqlite under --runs-dir)")


def to_markdown(df: pl.DataFrame) -> str:
    def fmt(v: object) -> str:
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join(lines) + "\n"


def report_args(doc: str | None, argv: list[str] | None) -> argparse.Namespace:
    """The arguments every report takes: EXPERIMENT, --runs-dir, --tracking-uri, --out,
    --no-log."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment")
    store_args(p)
    p.add_argument("--out", default=None)
    p.add_argument("--no-log", action="store_true", help="do not log a summary MLflow run")
    return p.parse_args(argv)
