"""When a training stops before its budget: a quality target reached, or a plateau.

A `StopRule` reads one evaluation metric's checkpoint history (step = tokens seen) and says
whether, and why, the training may stop there. Targets are absolute thresholds on the metric:
the sweeps turn relative targets into them before training starts (normalized CES >= 0.95 on
layer i is CES >= CES_0 + 0.95 (CES_scratch - CES_0), with CES_0 the zero-shot CES of the
source SAE there; "within m of the scratch SAE" is value >= scratch - m), so the rule needs
nothing but the run's own history. A plateau is a gain below `plateau_gain` over the last
`plateau_checkpoints` checkpoints. No ray, no mlflow.

`raysae.distributed.engine` applies a member's rule at each of its checkpoints and at each
check between them (`every_tokens`: an evaluation and a decision, no resume point), so a
stopped SAE leaves its group at the first check that meets the rule.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from raysae.config import StopConfig
from raysae.metrics import normalized_ces_defined


@dataclass(frozen=True)
class StopRule:
    """Stop once `metric` reaches `at_least`, or once it gained less than `plateau_gain` over
    the last `plateau_checkpoints` checkpoints (either that is set)."""

    metric: str
    """The evaluation metric read, as logged (e.g. `eval/ces`)."""
    at_least: float | None = None
    """The absolute target; None: no target (a plateau rule only)."""
    target: str = ""
    """How the target was asked for, for the reason (e.g. 'normalized CES >= 0.95')."""
    plateau_checkpoints: int = 0
    """Checkpoints a plateau is measured over; 0: no plateau rule."""
    plateau_gain: float = 0.0
    """Less gain than this over `plateau_checkpoints` checkpoints is a plateau."""
    every_tokens: int | None = None
    """Tokens between checks beside the training's checkpoints (an evaluation and a stop
    decision, no resume point); None: at its checkpoints only."""

    def __post_init__(self) -> None:
        if self.at_least is None and self.plateau_checkpoints < 1:
            raise ValueError(f"StopRule on {self.metric}: neither a target nor a plateau")

    def reached(self, history: list[tuple[int, float]]) -> str | None:
        """Why the training may stop at the last checkpoint of `history` ((tokens, value) in
        order), or None."""
        if not history:
            return None
        tokens, value = history[-1]
        if self.at_least is not None and value >= self.at_least:
            return (f"target: {self.metric} {value:.6g} >= {self.at_least:.6g}"
                    f"{f' ({self.target})' if self.target else ''} at {tokens:,} tokens")
        k = self.plateau_checkpoints
        if k and len(history) > k and value - history[-1 - k][1] < self.plateau_gain:
            return (f"plateau: {self.metric} gained {value - history[-1 - k][1]:.3g} < "
                    f"{self.plateau_gain:g} over the last {k} checkpoints, at {tokens:,} tokens")
        return None

    def first_reached(self, history: list[tuple[int, float]]) -> tuple[int, str] | None:
        """(tokens, reason) of the first checkpoint of `history` at which the rule stops."""
        for n in range(1, len(history) + 1):
            reason = self.reached(history[:n])
            if reason is not None:
                return history[n - 1][0], reason
        return None

    def signature(self) -> str:
        """The rule as decided (every field but the wording of `target`): a run records it, and
        a re-submitted sweep whose rule differs re-decides where the run stops."""
        return json.dumps({k: v for k, v in asdict(self).items() if k != "target"}, sort_keys=True)

    def not_reached(self, tokens: int) -> str:
        """The reason a training that ran its whole budget gives."""
        what = [f"{self.metric} >= {self.at_least:.6g}" + (f" ({self.target})" if self.target else "")
                if self.at_least is not None else "",
                f"a plateau over {self.plateau_checkpoints} checkpoints" if self.plateau_checkpoints
                else ""]
        return f"budget: {' or '.join(w for w in what if w)} not reached in {tokens:,} tokens"


NO_RULE = "none"
"""The signature of no rule (a member without `stop`)."""


def no_rule_reason(budget: int) -> str:
    """Why a training that went on after a stop, now without a rule, ended."""
    return f"budget: no stop rule, the budget of {budget:,} tokens ran"


def signature(rule: StopRule | None) -> str:
    return NO_RULE if rule is None else rule.signature()


@dataclass(frozen=True)
class Decision:
    """Where a training with a new rule ends, read off what it already trained."""

    tokens: int
    """Tokens of its final SAE (a checkpoint on the way), or where it continues from."""
    reason: str | None
    """Why it stops at `tokens`; None: it must train on from `tokens`."""


def redecide(rule: StopRule | None, history: list[tuple[int, float]], trained: int,
             budget: int) -> Decision:
    """Apply `rule` to a training that went to `trained` tokens of its `budget` (checked at the
    points of `history`, (tokens, value of `rule.metric`) in order): it stops at the first
    point that meets the rule, at the budget when it trained it all, or goes on from `trained`.
    What a fresh training with `rule` would do, as training is deterministic: the same stream
    from the same state, checked at the same points."""
    if rule is not None:
        hit = rule.first_reached([(t, v) for t, v in history if t <= trained])
        if hit is not None:
            return Decision(*hit)
    if trained >= budget:
        return Decision(budget, rule.not_reached(budget) if rule is not None
                        else no_rule_reason(budget))
    return Decision(trained, None)


class NoTarget(ValueError):
    """A relative target that cannot be turned into a threshold for this SAE: why."""


def transfer_rule(cfg: StopConfig, scratch: Mapping[str, float],
                  zero_shot: Mapping[str, float]) -> StopRule:
    """A transfer SAE's rule on layer i from the final metrics of the scratch SAE of layer i and
    of the source SAE read zero-shot on layer i (`sweep.stop_at`). Normalized CES
    (CES - CES_0) / (CES_scratch - CES_0) >= t is CES >= CES_0 + t (CES_scratch - CES_0) while
    CES_scratch > CES_0; otherwise the normalized CES is undefined (the zero-shot SAE is already
    as good as the scratch one): `NoTarget`, unless a plateau rule is set, which then applies
    alone."""
    plateau = ({} if cfg.plateau_gain is None else
               {"plateau_checkpoints": cfg.plateau_checkpoints, "plateau_gain": cfg.plateau_gain})
    metric, at_least, target = "eval/ces", None, ""
    if cfg.normalized_ces is not None:
        s, z, t = scratch["eval/ces"], zero_shot["eval/ces"], cfg.normalized_ces
        if normalized_ces_defined(z, s):
            at_least = z + t * (s - z)
            target = f"normalized CES >= {t:g}: zero-shot CES {z:.4g}, scratch {s:.4g}"
        elif not plateau:
            raise NoTarget(f"no target: normalized CES is undefined here, the zero-shot CES "
                           f"{z:.4g} is already at least the scratch SAE's {s:.4g}")
    elif cfg.within_scratch is not None:
        metric = f"eval/{cfg.within_metric}"
        at_least = scratch[metric] - cfg.within_scratch
        target = f"within {cfg.within_scratch:g} of the scratch SAE's {scratch[metric]:.4g}"
    return StopRule(metric, at_least, target, every_tokens=cfg.check_every_tokens, **plateau)


def threshold_rule(thresholds: tuple[float, ...], every_tokens: int | None) -> StopRule:
    """Stop at the largest explained-variance threshold (`stitch.stop_at_thresholds`): the
    checkpoints on the way show where each smaller one was crossed."""
    top = max(thresholds)
    return StopRule("eval/explained_variance", top, f"the largest of ev_thresholds {thresholds}",
                    every_tokens=every_tokens)
