"""What the Ray tests plug into the engine's worker skeleton (`WorkerHooks`): a per-step trace
of every worker and a hard kill of one worker, once, mid-run. Shipped to the workers by value
(`ray.cloudpickle.register_pickle_by_value`), since tests/ is not importable there."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from raysae.distributed.engine import Fit, WorkerHooks


def param_digest(models: dict[str, torch.nn.Module]) -> str:
    h = hashlib.sha256()
    for key in sorted(models):
        for p in models[key].parameters():
            h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def row_digest(row: torch.Tensor) -> str:
    return hashlib.sha256(row.numpy().tobytes()).hexdigest()[:12]


@dataclass
class Trace(WorkerHooks):
    """Per worker and attempt, `rank<r>-from<step>.json` in `folder`: each step's digest of
    every member's parameters before the step and the digests of its rows (the first site's),
    the final digest, the worker's files."""

    folder: str
    kill_at_tokens: int | None = None
    """With `marker`: the worker of rank `kill_rank` dies (os._exit) when it fetches the batch
    that crosses this many tokens, once (the marker file records that it happened)."""
    marker: str | None = None
    kill_rank: int = 0

    def batches(self, batches: Iterator, fit: Fit, models: dict[str, torch.nn.Module],
                start_step: int) -> Iterator:
        self.steps: list[dict] = []
        tokens = start_step * fit.job.train.batch_size
        for batch in batches:
            x = next(iter(batch.values()))  # the first site's rows
            tokens += len(x) * fit.world
            if (self.kill_at_tokens is not None and fit.rank == self.kill_rank
                    and tokens > self.kill_at_tokens and not os.path.exists(self.marker)):
                Path(self.marker).touch()
                os._exit(1)  # a hard death, not an exception: nothing gets cleaned up
            self.steps.append({"params_before": param_digest(models),
                               "rows": [row_digest(r) for r in x]})
            yield batch

    def finished(self, fit: Fit, models: dict[str, torch.nn.Module], start_step: int) -> None:
        path = Path(self.folder) / f"rank{fit.rank}-from{start_step}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"steps": self.steps, "final": param_digest(models), "shards": fit.files}
        path.write_text(json.dumps(record))
