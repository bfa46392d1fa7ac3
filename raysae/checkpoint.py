"""Checkpoint files: folders that appear atomically, and the resumable training state.

`TrainState` is what SAE and stitch training both save and resume from. On disk it is a folder
of two files, `state.safetensors` (every tensor, keyed `model.*`, `optimizer.*`, `extra.*`) and
`state.json` (the step and token counters): nothing is ever unpickled. Every folder written
here (states, SAEs, stitches, dashboards) replaces its predecessor by rename, so a reader never
sees a half-written one. Pure torch, safetensors and json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
_GROUPS = ("model", "optimizer", "extra")


def write_folder_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp_dir)` then move the result to `path`, replacing any previous folder.

    Readers never see a half-written folder: the new one appears by rename, and an old one is
    moved aside (not deleted) before that rename, then removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


@dataclass
class TrainState:
    """Everything needed to continue a run exactly, for an SAE or a stitch alike."""

    step: int
    """Optimiser steps taken."""
    tokens_seen: int
    """Tokens consumed (global across workers)."""
    model: dict[str, Tensor]
    """The trained module's `state_dict`, on the CPU."""
    optimizer: dict[str, Tensor]
    """Adam's per-parameter state, flattened by `optimizer_tensors` (`{param_index}.{name}`)."""
    extra: dict[str, Tensor]
    """The rest, on the CPU: torch's RNG states `rng_cpu` (and `rng_cuda` when training on a
    GPU), and the learner's own counters (an SAE's `tokens_since_fired_F`, int64 per latent)."""


def save_train_state(state: TrainState, path: str | Path) -> Path:
    """Write `state` to folder `path` (safetensors + JSON), replacing any previous folder."""
    groups = {"model": state.model, "optimizer": state.optimizer, "extra": state.extra}
    tensors = {
        f"{g}.{k}": v.detach().cpu().contiguous() for g, d in groups.items() for k, v in d.items()
    }
    scalars = {"step": state.step, "tokens_seen": state.tokens_seen}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(scalars))

    return write_folder_atomically(path, write)


def train_state_counters(path: str | Path) -> tuple[int, int]:
    """(step, tokens_seen) of a folder written by `save_train_state`, without its tensors."""
    scalars = json.loads((Path(path) / STATE_JSON).read_text())
    return int(scalars["step"]), int(scalars["tokens_seen"])


def load_train_state(path: str | Path) -> TrainState:
    """Read a folder written by `save_train_state` (JSON + safetensors only)."""
    path = Path(path)
    scalars = json.loads((path / STATE_JSON).read_text())
    tensors = load_file(str(path / STATE_TENSORS))
    groups: dict[str, dict[str, Tensor]] = {g: {} for g in _GROUPS}
    for key, value in tensors.items():
        group, name = key.split(".", 1)
        groups[group][name] = value
    return TrainState(int(scalars["step"]), int(scalars["tokens_seen"]), **groups)


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    """The optimiser's per-parameter state flattened to `{param_index}.{name}` CPU copies."""
    return {
        f"{i}.{name}": value.detach().cpu().clone()
        for i, per_param in opt.state_dict()["state"].items()
        for name, value in per_param.items()
    }


def load_optimizer_tensors(opt: torch.optim.Optimizer, flat: dict[str, Tensor]) -> None:
    """Inverse of `optimizer_tensors`: load the flattened state into `opt`."""
    per_param: dict[int, dict[str, Tensor]] = {}
    for key, value in flat.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": per_param, "param_groups": opt.state_dict()["param_groups"]})
