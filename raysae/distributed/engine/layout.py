"""The runs-dir layout of a fit: where Ray Train keeps a group's commits, where each member's
checkpoints, stop states and final artefact are kept. Every path is derived from a stable key
only, so a restarted driver or a resumed worker finds the same folders."""

from __future__ import annotations

from pathlib import Path

from raysae.config import JobConfig, digest


def run_name_for(key: str) -> str:
    """A Ray Train run name derived only from the key: restarts find the same run directory."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return f"{safe[:80]}-{digest(key)}"


def train_runs_dir(job: JobConfig) -> Path:
    """Where Ray Train keeps every run's checkpoints (`<run name>/tokens_<n>/`)."""
    return Path(job.runs_dir).resolve() / "ray_train"


def output_dir(job: JobConfig, kind: str, key: str) -> Path:
    """Where the final artefact of the fit with this key is saved: `<runs_dir>/<kind>/<run>`."""
    return Path(job.runs_dir).resolve() / kind / run_name_for(key)


def checkpoints_dir(job: JobConfig, key: str) -> Path:
    """Where a member's checkpoint artefacts are kept: `<runs_dir>/checkpoints/<run>/`."""
    return Path(job.runs_dir).resolve() / "checkpoints" / run_name_for(key)


def checkpoint_dir(job: JobConfig, key: str, tokens: int) -> Path:
    """The folder of a member's checkpoint at `tokens` (its artefact, and its state if it stopped
    there)."""
    return checkpoints_dir(job, key) / f"tokens_{tokens:012d}"


def stop_state_dir(job: JobConfig, key: str, tokens: int) -> Path:
    """Where the training state of a member that stopped at `tokens` is kept: beside that
    checkpoint's artefact, so that a re-submitted sweep with a higher target trains it on."""
    return checkpoint_dir(job, key, tokens) / "state"


def checkpoint_folders(job: JobConfig, key: str, artifact: str) -> list[tuple[int, Path]]:
    """(tokens seen, artefact folder) of every checkpoint of the member with this key, in order
    (`<runs_dir>/checkpoints/<run>/tokens_<n>/<artifact>`)."""
    found = checkpoints_dir(job, key).glob(f"tokens_*/{artifact}")
    return sorted((int(d.parent.name.removeprefix("tokens_")), d) for d in found)
