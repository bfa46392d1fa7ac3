"""A member's MLflow run, kept by rank 0: opened or continued by the member's key, its training
metrics and checkpoint evaluations logged at tokens seen, its checkpoints kept as artefact
folders, and finished (or failed) with the tags a re-submitted sweep reads back."""

from __future__ import annotations

import ray
import torch

from raysae.checkpoint import TrainState
from raysae.distributed.engine.fit import Fit
from raysae.distributed.engine.layout import checkpoint_dir, output_dir
from raysae.distributed.engine.specs import RunSpec
from raysae.distributed.engine.tags import (
    ERROR_TAG,
    GROUP_TAG,
    NODES_TAG,
    STOP_RULE_TAG,
    STOP_TAG,
    TOKENS_TAG,
)
from raysae.stopping import StopRule, no_rule_reason, signature
from raysae.tracking import Tracker


class MemberRun:
    """A member's MLflow run (rank 0): opened or continued by key, metrics at tokens seen."""

    def __init__(self, fit: Fit, member: RunSpec, tracker: Tracker):
        self.fit, self.member, self.tracker = fit, member, tracker
        tags = {**fit.run_tags(member), **member.tags, GROUP_TAG: fit.spec.key}
        self.run_id = tracker.open_run(member.key, member.name, tags, fit.run_params(member),
                                       member.parent_run)
        # every node rank 0 has run this member on (a resumed member may move)
        node = ray.get_runtime_context().get_node_id()
        nodes = [n for n in tracker.tags(self.run_id).get(NODES_TAG, "").split(",") if n]
        if node not in nodes:
            tracker.set_tags(self.run_id, {NODES_TAG: ",".join([*nodes, node])})
        self._history: dict[int, float] | None = None  # the stop rule's metric, by tokens

    def _stop_history(self, rule: StopRule) -> dict[int, float]:
        """The values the stop rule reads: from MLflow once (a resumed run's), then kept here
        as they are logged (no round trip to the tracking server per check)."""
        if self._history is None:
            self._history = dict(self.tracker.history(self.run_id, rule.metric))
        return self._history

    def log_train(self, tokens: int, values: dict[str, float]) -> None:
        self.tracker.log_metrics(self.run_id, {f"train/{k}": v for k, v in values.items()}, tokens)

    def checkpoint(self, model: torch.nn.Module, state: TrainState, evaluation: dict[str, float],
                   final: bool) -> dict[str, float]:
        """Log the evaluation; keep the artefact as this checkpoint's folder, and as the final
        artefact when the member is done."""
        fit, key = self.fit, self.member.key
        values = {"tokens_seen": state.tokens_seen, **evaluation}
        self.tracker.log_metrics(self.run_id, values, step=state.tokens_seen)
        if self.member.stop is not None:
            self._stop_history(self.member.stop)[state.tokens_seen] = values[self.member.stop.metric]
        fit.save(model, checkpoint_dir(fit.job, key, state.tokens_seen) / fit.artifact)
        if final:
            self.save_final(model)
        return values

    def save_final(self, model: torch.nn.Module) -> None:
        """Save the member's final artefact (its last checkpoint's model)."""
        self.fit.save(model, output_dir(self.fit.job, self.fit.output_kind, self.member.key))

    def fail(self, error: str) -> None:
        """The member stopped short of its budget (idempotent); its checkpoints stay."""
        if self.tracker.status(self.run_id) != "FAILED":
            self.tracker.set_tags(self.run_id, {ERROR_TAG: error[:5000]})
            self.tracker.finish(self.run_id, "FAILED")

    def stop_reason(self) -> str | None:
        """Why the member may stop at its last logged checkpoint (its stop rule), or None."""
        rule = self.member.stop
        if rule is None:
            return None
        return rule.reached(sorted(self._stop_history(rule).items()))  # a replayed step once

    def finish(self, tokens_seen: int, seconds: dict[str, float] | None = None,
               stopped: str | None = None) -> None:
        """Idempotent: a resumed group finishes the runs of members done before the failure.
        `seconds`: where the group's rank 0 spent its time so far (`time/...`); `stopped`: why
        a member with a stop rule stopped (by default: it ran its budget without reaching it)."""
        if self.tracker.status(self.run_id) == "FINISHED":
            return
        if seconds:
            self.tracker.log_metrics(self.run_id, {f"time/{k}_s": v for k, v in seconds.items()},
                                     step=tokens_seen)
        out = output_dir(self.fit.job, self.fit.output_kind, self.member.key)
        self.tracker.log_artifacts(self.run_id, out, self.fit.artifact)
        self.tracker.set_tags(self.run_id, {TOKENS_TAG: str(tokens_seen)}
                              | self._stop_tags(tokens_seen, stopped))
        self.tracker.finish(self.run_id)

    def _stop_tags(self, tokens_seen: int, stopped: str | None) -> dict[str, str]:
        """Why the member ended where it did, and by which rule (for a re-submitted sweep)."""
        rule, tags = self.member.stop, {}
        if rule is not None:  # (a member resumed after its group's commit: again)
            tags[STOP_TAG] = stopped or self.stop_reason() or rule.not_reached(tokens_seen)
        if rule is not None or self.member.resume_from:
            tags[STOP_RULE_TAG] = signature(rule)
        if rule is None and self.member.resume_from:
            tags[STOP_TAG] = no_rule_reason(tokens_seen)
        return tags


def log_readout(fit: Fit, tracker: Tracker, readout: RunSpec, evaluation: dict[str, float]
                ) -> None:
    """A readout's evaluation as a finished run of its own (found again by key: idempotent)."""
    tags = {**fit.run_tags(readout), **readout.tags, GROUP_TAG: fit.spec.key}
    run_id = tracker.open_run(readout.key, readout.name, tags, {}, readout.parent_run)
    tracker.log_metrics(run_id, evaluation, step=0)
    tracker.finish(run_id)
