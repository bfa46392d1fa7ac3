"""Helpers shared by the analysis scripts (MLflow location, markdown tables); no training code."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import polars as pl


def tracking_uri(runs_dir: str) -> str:
    """MLFLOW_TRACKING_URI, else the sqlite store under the runs directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


def to_markdown(df: pl.DataFrame) -> str:
    def fmt(v: object) -> str:
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join(lines) + "\n"


def report_args(doc: str | None, argv: list[str] | None) -> argparse.Namespace:
    """The arguments every report takes: EXPERIMENT, --runs-dir, --out, --no-log."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--out", default=None)
    p.add_argument("--no-log", action="store_true", help="do not log a summary MLflow run")
    return p.parse_args(argv)
