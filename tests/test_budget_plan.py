"""The plan search: the cheapest scratch/transfer layout for a target, on fabricated curves."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from raysae.transfer.budget_plan import (
    _price,
    cheapest_budget_plan,
    price_compute_plan,
    tokens_to_target,
    transfer_costs,
)


def test_cost_of_a_transfer_is_its_first_checkpoint_at_the_target_over_all_its_runs():
    assert tokens_to_target([(10, 0.5), (20, 0.94), (30, 0.96), (40, 0.99)], 0.95) == 30
    assert tokens_to_target([(10, 0.5)], 0.95) is None
    curves = {(1, 0): [[(10, 0.5), (50, 0.97)], [(10, 0.6), (20, 0.96)]], (0, 1): [[(10, 0.2)]]}
    assert transfer_costs(curves, 0.95) == {(1, 0): 20}  # (0, 1) never gets there: unusable


def test_known_cheapest_plan_on_four_layers():
    scratch = dict.fromkeys(range(4), 100)
    costs = {(1, 0): 10, (0, 1): 50, (2, 1): 80, (2, 3): 20, (3, 2): 10, (1, 2): 15}
    # {0, 2}: 200 + 1<-0 (10) + 3<-2 (10) = 220; {0, 3}: 230; {1, 3}: 270; {1, 2}: 260
    plan = cheapest_budget_plan(scratch, costs)
    assert plan.scratch == (0, 2) and plan.transfers == {1: (0, 10), 3: (2, 10)}
    assert plan.tokens == 220 and plan.scratch_everywhere == 400
    assert plan.saving == pytest.approx(0.45)


def test_a_layer_no_transfer_reaches_is_trained_from_scratch():
    plan = cheapest_budget_plan(dict.fromkeys(range(3), 100), {(1, 0): 10})
    assert plan.scratch == (0, 2) and plan.transfers == {1: (0, 10)}
    assert cheapest_budget_plan(dict.fromkeys(range(3), 100), {}).scratch == (0, 1, 2)


def _brute(scratch, costs):
    layers = sorted(scratch)
    plans = [_price(layers, scratch, costs, c) for n in range(1, len(layers) + 1)
             for c in itertools.combinations(layers, n)]
    return min(p.tokens for p in plans if p is not None)


@pytest.mark.parametrize("seed", range(30))
def test_chain_programme_equals_every_subset(seed):
    """Offsets -1/+1 take the linear programme; it finds the optimum of the exhaustive search."""
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    scratch = {i: rng.randint(50, 150) for i in range(n)}
    costs = {(i, j): rng.randint(1, 120) for i in range(n) for j in (i - 1, i + 1)
             if 0 <= j < n and rng.random() < 0.8}
    plan = cheapest_budget_plan(scratch, costs)
    assert plan.tokens == _brute(scratch, costs)
    # and the plan is what it says: every transfer from a scratch layer at its cost
    assert set(plan.scratch) | set(plan.transfers) == set(range(n))
    assert all(j in plan.scratch and costs[i, j] == t for i, (j, t) in plan.transfers.items())
    assert plan.tokens == sum(scratch[i] for i in plan.scratch) + sum(
        t for _, t in plan.transfers.values())


def test_other_offsets_search_every_subset():
    scratch = dict.fromkeys(range(5), 100)
    costs = {(i, j): 5 for i in range(5) for j in range(5) if i != j and abs(i - j) <= 2}
    plan = cheapest_budget_plan(scratch, costs)  # one scratch layer in the middle reaches all within 2
    assert plan.scratch == (2,) and plan.tokens == 120


def test_fixed_plan_is_priced_at_its_budget():
    scratch = dict.fromkeys(range(4), 100)
    curves = {(1, 0): [[(10, 0.8), (50, 0.97)]], (3, 2): [[(10, 0.9), (50, 0.93)]]}
    tokens, worst = price_compute_plan([0, 1, 2, 3], scratch, curves, [0, 2], {1: 0, 3: 2}, 50)
    assert tokens == 300 and worst == pytest.approx(0.93)
    assert math.isnan(price_compute_plan([0, 1, 2, 3], scratch, curves, [0, 2], {1: 0, 3: 2}, 30)[1])


def test_plan_target_before_the_sweep_ran_names_what_is_missing(tmp_path, token_file, capsys):
    """`raysae plan CONFIG --target T` reads a finished sweep; before one ran it says which
    scratch SAE has no finished run, and exits 2 (the plan itself: tests/test_sweep.py)."""
    import yaml
    from test_sweep import CONFIG

    from raysae.cli import main

    cfg = {**CONFIG, "name": "plan-before", "data": {**CONFIG["data"], "source": str(token_file)}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["plan", str(path), "--runs-dir", str(tmp_path / "runs"), "--target", "0.9"])
    err = capsys.readouterr().err
    assert code == 2
    assert "plan --target: L0 scratch has no finished run in experiment 'plan-before'" in err
    assert "run the sweep first" in err
