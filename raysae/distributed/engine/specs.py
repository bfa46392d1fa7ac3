"""What a Ray Train run trains, as data the driver hands its workers: a group (`FitSpec`) of
members (`RunSpec`), and what the run gives back per member (`FitResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from raysae.stopping import StopRule


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One member of a fit: its identity and MLflow placement; each Fit's members add what
    they train (a layer, a width, a budget, a start)."""

    key: str
    """Stable identity: the MLflow run key, its checkpoint and output folders."""
    name: str
    """Readable run name (MLflow UI)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra MLflow tags (grid axes)."""
    parent_run: str | None = None
    """MLflow parent run id (a sweep)."""
    stop: StopRule | None = None
    """When the member may stop before its budget (checked at each of its checkpoints): it then
    leaves the group, its last checkpoint its final artefact."""
    resume_from: str | None = None
    """A training state folder the member goes on from (one that stopped, whose sweep now asks
    for more): its group's stream starts at that state's step, as it would have gone on."""
    readouts: tuple[RunSpec, ...] = ()
    """Evaluations of the member's final artefact read elsewhere (the zero-shot matrix: a
    scratch SAE read at every layer), each a member-like spec with its own key, run and site;
    evaluated in the same pass as the member's final checkpoint and logged, at step 0, to a
    finished run of its own."""


@dataclass(frozen=True, kw_only=True)
class FitSpec:
    """One Ray Train run: a group of members trained from one data stream."""

    key: str
    """The group's stable identity: the Ray Train run name."""
    members: tuple[RunSpec, ...]


@dataclass(frozen=True)
class FitResult:
    out_dir: Path
    """The final artefact's folder."""
    run_id: str
    """MLflow run id."""
    metrics: dict[str, float]
    """Metrics of the final checkpoint (none when the member failed)."""
    error: str | None = None
    """Why the member stopped short of its budget (it diverged), while the others went on."""
