"""The group's stop rules behind one policy: when a member's rule is checked between its
checkpoints, and the decision at a check, taken by rank 0 (the one worker that evaluates) and
followed by every worker, so that all drop a stopped member at the same step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from raysae.distributed.engine.collectives import from_rank0
from raysae.distributed.engine.members import MemberRun
from raysae.distributed.engine.specs import RunSpec


class Checked(Protocol):
    """A member as the policy sees it: its spec and (rank 0) its run."""

    spec: RunSpec
    run: MemberRun | None


class StopPolicy:
    """The stop rules of one group's members (`RunSpec.stop`)."""

    def __init__(self, world: int) -> None:
        self.world = world

    def check_due(self, member: RunSpec, tokens_before: int, tokens: int) -> bool:
        """Whether a step from `tokens_before` to `tokens` crosses one of the member's stop
        checks between checkpoints (`StopRule.every_tokens`)."""
        rule = member.stop
        return (rule is not None and bool(rule.every_tokens)
                and tokens // rule.every_tokens > tokens_before // rule.every_tokens)

    def decide(self, evaluated: Sequence[Checked]) -> dict[str, str]:
        """Key -> why, for the members just evaluated whose rule holds at this step: rank 0
        reads each run's history; the other workers receive its decisions."""
        why = {m.spec.key: reason for m in evaluated
               if m.run is not None and (reason := m.run.stop_reason()) is not None}
        if self.world > 1 and any(m.spec.stop is not None for m in evaluated):
            why = from_rank0(why)  # every worker drops the stopped members at this step
        return why
