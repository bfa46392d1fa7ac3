"""Helpers shared by the analysis scripts (MLflow location, markdown tables); no training code."""

from __future__ import annotations

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
