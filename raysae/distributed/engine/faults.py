"""Failures told apart: a failed group's root cause -> its kind, and what the phase does next.

- `member`: the member's own data or settings (a corrupted shard, a bad site): the group is
  split and its members retried one per group, so the SAEs that shared its stream go on;
- `out-of-memory`: the group did not fit its worker: re-planned smaller, halved (every member
  kept; a half that still does not fit is halved again), and the phase says so;
- `storage`, `tracking`, `network` (NCCL or Gloo, a lost node or worker): the infrastructure,
  not a member: Tune has already retried the whole group from its last committed checkpoint up
  to `max_failures`; it is never split (each part would fail the same way);
- `config`: a misconfiguration found only now: the sweep stops and names it.

A member that diverged has left its group, which went on without it (`MEMBER_FAILED`): it is
none of these and is not retried. Every error the phase reports carries its kind
(`failed: [storage] OSError: ...`), so the sweep's summary says which kind each failure was.
"""

from __future__ import annotations

from raysae.config import ConfigError

FAULTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("config", ("ConfigError", "PreflightError")),
    ("out-of-memory", ("OutOfMemoryError", "out of memory", "MemoryError")),
    ("tracking", ("MlflowException", "mlflow.exceptions", "TrackingUnavailable")),
    ("storage", ("OSError", "IOError", "PermissionError", "FileNotFoundError", "No space left",
                 "Read-only file system", "Stale file handle", "botocore", "s3://", "NoSuchBucket")),
    ("network", ("NCCL", "nccl", "Gloo", "gloo", "NodeDiedError", "ActorDiedError",
                 "WorkerCrashedError", "RaySystemError", "ConnectionError", "ConnectionResetError",
                 "TimeoutError", "node died", "was terminated unexpectedly")),
)
"""(kind, what a root cause of that kind says), the first match wins; anything else is the
member's own."""

SPLIT = ("member", "out-of-memory")
"""The kinds whose group is retried in parts (`parts`)."""


def fault_kind(cause: str) -> str:
    """The kind of a failure from its root cause (the last line of the error, as Ray gives it)."""
    for kind, signs in FAULTS:
        if any(s in cause for s in signs):
            return kind
    return "member"


def label(error: str, kind: str) -> str:
    """`failed: <cause>` -> `failed: [<kind>] <cause>`."""
    head, sep, cause = error.partition(": ")
    return f"{head}{sep}[{kind}] {cause}" if sep else f"[{kind}] {error}"


def retry_plan(experiment: str, errors: dict[str, str], groups: dict[str, list[str]],
               diverged: str) -> tuple[dict[str, str], dict[str, str]]:
    """The groups to retry in parts, each with the kind that splits it (a member's own fault or
    out of memory, in a group of more than one member; a member's fault wins), and every error
    labelled with its kind. Raises ConfigError on a misconfiguration: the sweep stops there."""
    labelled, kinds = {}, {}
    for key, error in errors.items():
        if error.startswith(diverged):
            labelled[key] = error
            continue
        kinds[key] = kind = fault_kind(error)
        if kind == "config":
            raise ConfigError(f"{experiment}: a misconfiguration found while training {key}, the "
                              f"sweep stops: {error}")
        labelled[key] = label(error, kind)
    split = {}
    for g, members in groups.items():
        found = [k for k in SPLIT if any(kinds.get(m) == k for m in members)]
        if len(members) > 1 and found:
            split[g] = found[0]
    return split, labelled


def parts(n: int, kind: str) -> list[list[int]]:
    """The members (by index) of each group a failed group of `n` is retried as: out of memory,
    two halves (every member kept, the stream shared by fewer); a member's own fault, one per
    group (the bad member fails alone and the others go on)."""
    if kind == "out-of-memory":
        half = (n + 1) // 2
        return [list(range(half)), list(range(half, n))]
    return [[i] for i in range(n)]
