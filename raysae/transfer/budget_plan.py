"""The cheapest set of scratch and transferred layers for a target quality (issue #16).

From a (pilot) sweep: what each layer's scratch SAE costs (its budget: it is the reference a
normalized CES of 1 is measured against) and, for each transfer SAE_{i<-j}, its normalized CES
at every checkpoint. A transfer's cost for a target t is the tokens at its first checkpoint at
or above t (over every fine-tuning budget of the pair: a longer run's checkpoint counts, as an
early stop would have ended it there); one that never gets there cannot be used. A plan trains
some layers from scratch and reaches every other layer by transfer from one of them:

    minimise  sum_{i in S} scratch_i + sum_{i not in S} min_{j in S} transfer_{i<-j}

Exact: for offsets within {-1, +1} (the paper's forward and backward transfers) a dynamic
programme over the layers (each layer scratch, from below or from above; O(L)); for other
offsets every subset of scratch layers (at most MAX_BRUTE_FORCE_LAYERS layers). The paper's
fixed Appendix B.1 plans (scratch on alternate layers, fixed fine-tuning budgets) are priced
on the same curves for comparison. Pure: no torch, no ray, no mlflow.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

Curve = list[tuple[int, float]]
"""(tokens, normalized CES) at each checkpoint, in order."""
MAX_BRUTE_FORCE_LAYERS = 20
"""Layers beyond which offsets other than -1/+1 are refused (2^L subsets)."""


@dataclass(frozen=True)
class BudgetPlan:
    """Which layers train from scratch, which transfer from which, and what that costs."""

    scratch: tuple[int, ...]
    transfers: dict[int, tuple[int, int]]
    """Target layer -> (source layer, tokens of its fine-tuning)."""
    tokens: int
    """Tokens of the whole plan."""
    scratch_everywhere: int
    """Tokens of scratch SAEs on every layer."""

    @property
    def saving(self) -> float:
        """The share of scratch-everywhere's tokens the plan saves."""
        return 1 - self.tokens / self.scratch_everywhere


def tokens_to_target(curve: Curve, target: float) -> int | None:
    """Tokens at the first checkpoint with normalized CES >= target; None if none."""
    return next((tokens for tokens, value in curve if value >= target), None)


def transfer_costs(curves: dict[tuple[int, int], list[Curve]], target: float
                   ) -> dict[tuple[int, int], int]:
    """(target layer, source layer) -> the fewest tokens any of its runs needed to reach the
    target; pairs that never reached it are left out."""
    out = {}
    for pair, runs in curves.items():
        reached = [n for n in (tokens_to_target(c, target) for c in runs) if n is not None]
        if reached:
            out[pair] = min(reached)
    return out


def cheapest_budget_plan(scratch: dict[int, int], costs: dict[tuple[int, int], int]) -> BudgetPlan:
    """The plan of least tokens (ties: fewer scratch layers, then lower layers scratch)."""
    layers = sorted(scratch)
    if all(abs(j - i) == 1 for i, j in costs):
        return _chain(layers, scratch, costs)
    if len(layers) > MAX_BRUTE_FORCE_LAYERS:
        raise ValueError(f"plan search over {len(layers)} layers with transfer offsets "
                         f"{sorted({j - i for i, j in costs})}: expected offsets -1/+1 only, or "
                         f"at most {MAX_BRUTE_FORCE_LAYERS} layers")
    best: BudgetPlan | None = None
    for n in range(1, len(layers) + 1):
        for chosen in itertools.combinations(layers, n):
            plan = _price(layers, scratch, costs, chosen)
            if plan is not None and (best is None or plan.tokens < best.tokens):
                best = plan
    assert best is not None  # scratch everywhere is always a plan
    return best


def price_compute_plan(layers: list[int], scratch: dict[int, int], curves: dict[tuple[int, int], list[Curve]],
               scratch_layers: list[int], sources: dict[int, int], tokens: int) -> tuple[int, float]:
    """A fixed plan (Appendix B.1): scratch on `scratch_layers`, each other layer i fine-tuned
    for `tokens` from `sources[i]`. Returns (its tokens, the worst normalized CES of its
    transfers at that many tokens: from the pair's checkpoint there, NaN where no run has one)."""
    values = []
    for i, j in sources.items():
        at = [v for c in curves.get((i, j), []) for n, v in c if n == tokens]
        values.append(max(at) if at else math.nan)
    worst = math.nan if any(math.isnan(v) for v in values) else min(values, default=math.inf)
    total = sum(scratch[i] for i in scratch_layers) + tokens * len(sources)
    return total, worst


def _price(layers: list[int], scratch: dict[int, int], costs: dict[tuple[int, int], int],
           chosen: tuple[int, ...]) -> BudgetPlan | None:
    transfers = {}
    for i in layers:
        if i in chosen:
            continue
        options = [(costs[i, j], j) for j in chosen if (i, j) in costs]
        if not options:
            return None
        n, j = min(options)
        transfers[i] = (j, n)
    total = sum(scratch[i] for i in chosen) + sum(n for _, n in transfers.values())
    return BudgetPlan(tuple(chosen), transfers, total, sum(scratch.values()))


def _chain(layers: list[int], scratch: dict[int, int], costs: dict[tuple[int, int], int]
           ) -> BudgetPlan:
    """Offsets -1/+1: each layer is S (scratch), F (from the layer below, which is S) or B
    (from the layer above, which must then be S). best[label] = (tokens, labels so far)."""
    inf = (math.inf, ())
    best: dict[str, tuple[float, tuple[str, ...]]] = {"S": inf, "F": inf, "B": inf}
    for n, i in enumerate(layers):
        prev_i = layers[n - 1] if n else None
        here: dict[str, tuple[float, tuple[str, ...]]] = {"S": inf, "F": inf, "B": inf}
        for label in "SFB":
            if label == "S":
                cost = scratch[i]
            elif label == "F":
                cost = costs.get((i, i - 1), math.inf) if prev_i == i - 1 else math.inf
            else:
                cost = costs.get((i, i + 1), math.inf)
            starts = [(0.0, ())] if n == 0 else [
                best[p] for p in "SFB"
                if (p != "B" or label == "S")  # a B layer needs this one from scratch
                and (label != "F" or p == "S")  # an F layer needs the one below from scratch
            ]
            for total, labels in starts:
                cand = (total + cost, (*labels, label))
                if cand[0] < here[label][0] or (cand[0] == here[label][0]
                                                 and cand[1].count("S") < here[label][1].count("S")):
                    here[label] = cand
        best = here
    total, labels = min((best["S"], best["F"]), key=lambda b: (b[0], b[1].count("S")))
    chosen = tuple(i for i, label in zip(layers, labels) if label == "S")
    transfers = {i: (i - 1 if label == "F" else i + 1,
                     costs[i, i - 1 if label == "F" else i + 1])
                 for i, label in zip(layers, labels) if label != "S"}
    return BudgetPlan(chosen, transfers, int(total), sum(scratch.values()))
