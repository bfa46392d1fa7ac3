"""A phase run as plain Ray tasks (the evaluations that need no Train run): one task per group
of trial keys, run concurrently, a group's failure its keys' errors only."""

from __future__ import annotations

from typing import Any

import ray

from raysae.distributed import root_cause
from raysae.distributed.engine.phases import Done, Errors


def fan_out(
    task: Any,
    groups: dict[str, list[str]],
    *args: Any,
    max_retries: int,
    error_prefix: str = "failed",
    **options: Any,
) -> tuple[Done, Errors]:
    """One Ray task per group of trial keys, run concurrently: `task.remote(keys, *args)`
    returns {key: metrics}. A group's failure marks each of its keys with the root cause and
    does not stop the other groups."""
    refs = {label: task.options(max_retries=max_retries, **options).remote(keys, *args)
            for label, keys in groups.items()}
    done: Done = {}
    errors: Errors = {}
    for label, ref in refs.items():
        try:
            done.update(ray.get(ref))
        except Exception as e:
            for key in groups[label]:
                errors[key] = f"{error_prefix}: {root_cause(e)}"
    return done, errors
