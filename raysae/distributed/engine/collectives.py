"""How a group's workers agree: gradients averaged across them, rank 0's decisions sent to all."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def allreduce_mean(params: list[torch.Tensor]) -> None:
    """Average gradients across workers with a single all-reduce of one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every worker (a decision only rank 0, which evaluates, can take)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
