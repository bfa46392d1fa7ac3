"""What the Ray tests plug into a fit: `traced(...)` is the SAE group fit with a per-step trace
of every worker and, optionally, a hard kill of one worker, once, mid-run; `faulty(...)` the
fit with a planted failure (a full disk, an out-of-memory), for a phase's `run_group`. It overrides only
what a Fit is made of (`build`, `batches`), so the group loop runs as in production. Shipped to
the workers by value (`ray.cloudpickle.register_pickle_by_value`), since tests/ is not
importable there."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from raysae.config import JobConfig, from_dict
from raysae.distributed.training import SAEGroupFit, member_config


def param_digest(models: dict[str, torch.nn.Module]) -> str:
    h = hashlib.sha256()
    for key in sorted(models):
        for p in models[key].parameters():
            h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def row_digest(row: torch.Tensor) -> str:
    return hashlib.sha256(row.numpy().tobytes()).hexdigest()[:12]


@dataclass(frozen=True)
class Trace:
    """Per worker and attempt that runs its group to the end, `rank<r>-from<step>.json` in
    `folder`: each step's digest of every member's parameters before the step and the digests
    of its rows (the first site's), and the final digest."""

    folder: str
    kill_at_tokens: int | None = None
    """With `marker`: the worker of rank `kill_rank` dies (os._exit) when it fetches the batch
    that crosses this many tokens, once (the marker file records that it happened)."""
    marker: str | None = None
    kill_rank: int = 0


class TracedFit(SAEGroupFit):
    """The SAE group fit, traced (`Trace`): its members' models kept as they are built, its
    stream recorded batch by batch, the record written when the stream is closed at the end."""

    trace: ClassVar[Trace]

    def __init__(self, *args, **kwargs) -> None:
        self.models: dict[str, torch.nn.Module] = {}
        super().__init__(*args, **kwargs)

    def build(self, member, state):
        model = super().build(member, state)
        self.models[member.key] = model
        return model

    def batches(self, skip_batches: int) -> Generator:
        trace, steps = self.trace, []
        tokens = skip_batches * self.job.train.batch_size
        budget = max(member_config(self.job, m)[1].num_tokens for m in self.spec.members)
        try:
            for batch in super().batches(skip_batches):
                x = next(iter(batch.values()))  # the first site's rows
                tokens += len(x) * self.world
                if (trace.kill_at_tokens is not None and self.rank == trace.kill_rank
                        and tokens > trace.kill_at_tokens and not os.path.exists(trace.marker)):
                    Path(trace.marker).touch()
                    os._exit(1)  # a hard death, not an exception: nothing gets cleaned up
                steps.append({"params_before": param_digest(self.models),
                              "rows": [row_digest(r) for r in x]})
                yield batch
        finally:  # closed by the group loop: written only by a worker that trained to the end
            if tokens >= budget:
                path = Path(trace.folder) / f"rank{self.rank}-from{skip_batches}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"steps": steps, "final": param_digest(self.models)}))


def traced(folder: str, **kill) -> type[SAEGroupFit]:
    """The traced fit writing to `folder` (`kill`: `Trace`'s kill settings)."""
    return type("TracedFit", (TracedFit,), {"trace": Trace(folder, **kill), "__module__": __name__})


def worker_shards(directory: str | Path, rank: int, world: int) -> list[str]:
    """The shard files worker `rank` of `world` reads: shard i to worker i mod world."""
    from raysae.shards import ActivationReader

    return [s.file for s in ActivationReader(directory).manifest.shards][rank::world]


@dataclass(frozen=True)
class Fault:
    """A planted failure: `storage` raises OSError(ENOSPC) once the stream passes `at_tokens`
    (every attempt); `oom` raises torch.OutOfMemoryError from `member`'s step while its group
    holds more than `fits` members (as a group too large for its GPU would)."""

    kind: str
    at_tokens: int = 0
    member: str | None = None
    fits: int = 1


class FaultyFit(SAEGroupFit):
    fault: ClassVar[Fault]

    def batches(self, skip_batches: int) -> Generator:
        tokens = skip_batches * self.job.train.batch_size
        for batch in super().batches(skip_batches):
            tokens += self.job.train.batch_size
            if self.fault.kind == "storage" and tokens > self.fault.at_tokens:
                raise OSError(errno.ENOSPC, "No space left on device", self.job.runs_dir)
            yield batch

    def member_batch(self, member, batch):
        if self.fault.kind == "oom" and member.key == self.fault.member and len(self.spec.members) > self.fault.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().member_batch(member, batch)


def faulty_group(key: str, job: dict, groups: dict, max_failures: int, fault: Fault):
    """A phase's `run_group` (as `training.run_sae_group`) with the fault planted."""
    from raysae.distributed.engine import fit_on_ray

    spec = groups.get(key)
    if spec is None or not spec.members:
        return {}
    fit = type("FaultyFit", (FaultyFit,), {"fault": fault, "__module__": __name__})
    return fit_on_ray(from_dict(JobConfig, job), spec, fit, max_failures=max_failures)
