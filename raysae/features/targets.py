"""What a sweep's feature phase evaluates: each trained SAE (a target), found by its training
key, and the SAEs shown beside it feature by feature (those transferred from it). Each study
says which SAEs these are (`transfer.grid.feature_targets`, `stitching.pairs.feature_targets`);
`raysae.distributed.features` evaluates them."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple


class SAERef(NamedTuple):
    """A trained SAE found by its training key."""

    label: str
    """Readable name (dashboard column titles)."""
    key: str
    """Its training key."""
    layer: int
    """Layer the SAE reads."""
    large: bool = False
    """Whether it reads the stitch sweep's large model B."""


@dataclasses.dataclass(frozen=True)
class FeatureTarget:
    """One trained SAE to evaluate."""

    key: str
    """Its training key: MLflow run, checkpoints and final SAE folder are found by it."""
    name: str
    """Readable name (dashboard titles)."""
    layer: int
    """Layer the SAE reads (its site is the sweep's)."""
    large: bool = False
    """Whether the SAE reads the stitch sweep's large model B (`stitch.large`), not `model`."""
    compare: tuple[SAERef, ...] = ()
    """SAEs transferred from this one, shown beside it feature by feature."""
