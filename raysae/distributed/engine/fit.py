"""What a Ray Train run trains, seen from one worker: a `Fit` builds a group's members, gives
this worker's share of the stream, evaluates and saves; the group loop (`group.py`) does the
rest, the same for every Fit. Before any worker starts, `Fit.check` refuses on the driver the
settings the data cannot honour, with one message for every Fit (`StreamSupply`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator
from pathlib import Path
from typing import Any, ClassVar

import torch

from raysae.checkpoint import TrainState
from raysae.config import JobConfig
from raysae.distributed.engine.specs import FitSpec, RunSpec
from raysae.sources import StreamSupply, check_stream
from raysae.train import Trainer

RANK_SEED_STRIDE = 7919
"""Worker r shuffles its data with seed + r·stride (a prime: no two ranks share a seed)."""


def worker_seed(seed: int, rank: int) -> int:
    """The data-order seed of worker `rank`."""
    return seed + RANK_SEED_STRIDE * rank


class Fit(ABC):
    """What one Ray Train run trains, built on every worker from the job and the spec."""

    artifact: ClassVar[str]
    """The artefact's folder name in a checkpoint and its MLflow artifact path."""
    output_kind: ClassVar[str]
    """The folder under runs_dir that holds the final artefacts of this kind."""

    def __init__(self, job: JobConfig, spec: FitSpec, rank: int, world: int, device: torch.device):
        self.job, self.spec, self.rank, self.world, self.device = job, spec, rank, world, device

    @classmethod
    def check(cls, job: JobConfig, spec: FitSpec) -> None:
        """On the driver, before any worker starts: raise on settings the data cannot honour."""
        check_stream(job, cls.supply(job, spec))

    @classmethod
    @abstractmethod
    def supply(cls, job: JobConfig, spec: FitSpec) -> StreamSupply:
        """What the group's data can give (read on the driver, from the data alone)."""

    @abstractmethod
    def build(self, member: RunSpec, state: TrainState | None) -> torch.nn.Module:
        """A member's model on this worker's device, identical on every worker (a resumed
        member loads `state` in its trainer)."""

    @abstractmethod
    def trainer(self, member: RunSpec, model: torch.nn.Module, state: TrainState | None,
                **loop: Any) -> Trainer:
        """The member's loop; `loop` carries on_metrics, on_checkpoint, allreduce_grads and
        world_size."""

    @abstractmethod
    def batches(self, skip_batches: int) -> Generator[Any, None, None]:
        """This worker's stream, from batch `skip_batches` on (those before were consumed); a
        generator, closed when the group ends, so that what a stream holds is let go then."""

    @abstractmethod
    def member_batch(self, member: RunSpec, batch: Any) -> Any:
        """The part of a stream batch a member trains on."""

    @abstractmethod
    def run_tags(self, member: RunSpec) -> dict[str, str]:
        """MLflow tags of a member's run (beside the member's own)."""

    @abstractmethod
    def run_params(self, member: RunSpec) -> dict[str, str]:
        """MLflow params of a member's run."""

    @abstractmethod
    def evaluate(self, due: dict[str, tuple[RunSpec, torch.nn.Module, TrainState]]
                 ) -> dict[str, dict[str, float]]:
        """Rank 0 at the checkpoints of the members due at this step, all at once (so that
        they share the reference forwards): key -> metrics logged at step = tokens seen."""

    @abstractmethod
    def save(self, model: torch.nn.Module, folder: Path) -> Path:
        """Write the artefact (an SAELens folder, a stitch folder)."""
