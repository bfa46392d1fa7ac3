"""The sweep grid: one declaration expands to the expected trials, keys and names."""

from __future__ import annotations

import dataclasses

import pytest

from raysae.config import (
    CacheConfig,
    ConfigError,
    DataConfig,
    JobConfig,
    ModelConfig,
    SAEConfig,
    StopConfig,
    SweepConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from raysae.transfer.grid import (
    base_digest,
    budget_plan_trials,
    compute_plan_pairs,
    compute_plan_summary,
    expand,
    phases,
    references,
    train_config_for,
)

LAYERS = (0, 1, 2, 3)


def build_job(**overrides: object) -> JobConfig:
    parts: dict[str, object] = dict(
        name="grid",
        model=ModelConfig(name="tiny"),
        data=DataConfig(source="tokens.parquet", context_length=16, num_tokens=512),
        cache=CacheConfig(layers=LAYERS),
        train=TrainConfig(num_tokens=1_000_000, batch_size=4096),
    )
    parts.update(overrides)
    return JobConfig(**parts)  # type: ignore[arg-type]


def build_sweep(**overrides: object) -> SweepConfig:
    parts: dict[str, object] = dict(layers=LAYERS, finetune_budgets=(200_000, 400_000))
    parts.update(overrides)
    return SweepConfig(**parts)  # type: ignore[arg-type]


def grid(job: JobConfig | None = None, sweep: SweepConfig | None = None):
    job = job or build_job()
    return expand(job, sweep or build_sweep(), base_digest(job, "fp"))


def test_counts_by_phase():
    by_phase = phases(grid())
    counts = {p: len(ts) for p, ts in by_phase.items()}
    # plans at 50% of 1M tokens, which no fine-tuning budget (200k, 400k) reaches: runs of their
    # own. Forward: scratch on 0 and 2 (reused), L1<-L0 and L3<-L2; backward: scratch on 1 and
    # 3, L0<-L1 and L2<-L3
    assert counts == {"scratch": 4, "zeroshot": 16, "transfer": 12, "plan": 4}
    assert list(by_phase) == ["scratch", "zeroshot", "transfer", "plan"]
    assert [(t.layer, t.source_layer, t.budget, t.direction) for t in by_phase["plan"]] == [
        (1, 0, 500_000, "forward"),
        (3, 2, 500_000, "forward"),
        (0, 1, 500_000, "backward"),
        (2, 3, 500_000, "backward"),
    ]
    # runs carry the stored labels (tag and name), as every run logged before does
    assert [t.tags["raysae.direction"] for t in by_phase["plan"]] == ["fwd", "fwd", "bwd", "bwd"]
    assert by_phase["plan"][2].name == "L0←L1 bwd 50%"
    assert len(phases(grid(sweep=build_sweep(compute_plan=False)))["plan"]) == 0
    forward = phases(grid(sweep=build_sweep(compute_plan_directions=("forward",))))["plan"]
    assert [(t.layer, t.source_layer) for t in forward] == [(1, 0), (3, 2)]


def test_dependencies_point_at_scratch_of_source():
    trials = grid()
    scratch = {t.layer: t.key for t in trials if t.phase == "scratch"}
    for t in trials:
        if t.phase == "scratch":
            assert t.depends_on == () and t.source_layer is None
        else:
            assert t.depends_on == (scratch[t.source_layer],)
    transfers = [t for t in trials if t.phase == "transfer"]
    assert {(t.layer, t.source_layer) for t in transfers} == {
        (1, 0),
        (2, 1),
        (3, 2),
        (0, 1),
        (1, 2),
        (2, 3),
    }
    assert all(t.lr == 1e-5 for t in transfers)
    zs = [t for t in trials if t.phase == "zeroshot"]
    assert {(t.layer, t.source_layer) for t in zs} == {(i, j) for i in LAYERS for j in LAYERS}
    assert all(t.budget == 0 and not t.trains for t in zs)


def test_keys_stable_unique_and_sensitive():
    a, b = grid(), grid()
    assert [t.key for t in a] == [t.key for t in b]
    assert len({t.key for t in a}) == len(a)
    keys = {t.key for t in a}
    for changed in (
        grid(job=build_job(sae=SAEConfig(l1_coefficient=1.0))),
        grid(job=build_job(train=TrainConfig(num_tokens=1_000_000, lr=1e-4))),
    ):
        assert not keys & {t.key for t in changed}
    # a new fine-tuning lr leaves scratch and zero-shot trials alone
    lr = grid(sweep=build_sweep(finetune_lr=2e-5))
    same = {t.phase for t in lr if t.key in keys}
    assert same == {"scratch", "zeroshot"}
    job = build_job()
    assert expand(job, build_sweep(), base_digest(job, "other"))[0].key != a[0].key


def test_names_and_tags():
    trials = grid()
    names = {t.name for t in trials}
    assert {
        "L3 scratch",
        "L3←L2 fwd 200k",
        "L2←L3 bwd 400k",
        "L3←L2 fwd 50%",
        "L3←L1 zero-shot",
    } <= names
    assert len(names) == len(trials)
    one = grid(sweep=build_sweep(finetune_budgets=(200_000,)))
    assert "L3←L2 fwd" in {t.name for t in one}
    t = next(t for t in trials if t.name == "L2←L3 bwd 400k")
    assert t.tags == {
        "raysae.phase": "transfer",
        "raysae.layer": "2",
        "raysae.source_layer": "3",
        "raysae.direction": "bwd",
        "raysae.budget": "400000",
        "raysae.architecture": "relu",
        "raysae.site": "resid_post",
    }
    assert train_config_for(build_job(), t).num_tokens == 400_000
    assert train_config_for(build_job(), t).lr == 1e-5


def test_offsets_are_a_grid_axis():
    trials = grid(sweep=build_sweep(offsets=(-2,), finetune_budgets=(200_000,)))
    tr = [t for t in trials if t.phase == "transfer"]
    assert [(t.layer, t.source_layer, t.direction) for t in tr] == [
        (2, 0, "offset-2"),
        (3, 1, "offset-2"),
    ]
    assert tr[0].name == "L2←L0 offset-2"


def test_plan_dedupes_against_transfer_and_summary():
    for source in ("checkpoint", "run"):  # a budget equal to the plan's: that transfer trial
        sweep = build_sweep(finetune_budgets=(500_000,), compute_plan_from=source)
        trials = grid(sweep=sweep)
        assert phases(trials)["plan"] == []
        summary = compute_plan_summary(build_job(), sweep, trials)
        assert summary["scratch_everywhere_tokens"] == 4_000_000
        assert summary["compute_plan_budget"] == 500_000
        fwd, bwd = summary["plans"]
        assert (fwd["direction"], bwd["direction"]) == ("forward", "backward")
        for plan in (fwd, bwd):
            assert plan["tokens"] == 3_000_000
            assert plan["saved_fraction"] == pytest.approx(0.25)
        assert (fwd["scratch_layers"], fwd["transfers"]) == ([0, 2], [[1, 0], [3, 2]])
        assert (bwd["scratch_layers"], bwd["transfers"]) == ([1, 3], [[0, 1], [2, 3]])
        index = {t.key: t for t in trials}
        members = [(index[m["key"]].phase, index[m["key"]].layer, index[m["key"]].source_layer,
                    m["tokens"], m["from"]) for m in bwd["members"]]
        assert members == [
            ("scratch", 1, None, 1_000_000, "scratch"),
            ("scratch", 3, None, 1_000_000, "scratch"),
            ("transfer", 0, 1, 500_000, "run"),
            ("transfer", 2, 3, 500_000, "run"),
        ]
    # 10% of the budget: 45% fewer tokens (Appendix B.1), both directions
    s = build_sweep(compute_plan_budget_fraction=0.1)
    plans = compute_plan_summary(build_job(), s, grid(sweep=s))["plans"]
    assert [p["saved_fraction"] for p in plans] == pytest.approx([0.45, 0.45])


def test_plan_reads_the_checkpoint_of_a_longer_fine_tuning():
    """The paper's 10% point: the 100M checkpoint of the 500M run (here 500k of 1M), no run of
    its own; `run` trains one; a plan budget between checkpoints falls back to a run."""
    job = build_job(train=TrainConfig(num_tokens=1_000_000, batch_size=4096,
                                      checkpoint_every_tokens=250_000))
    sweep = build_sweep(finetune_budgets=(200_000, 1_000_000))  # plan: 500k, a checkpoint of 1M
    trials = grid(job, sweep)
    assert phases(trials)["plan"] == []
    index = {t.key: t for t in trials}
    for plan in compute_plan_summary(job, sweep, trials)["plans"]:
        read = [(index[m["key"]].name, m["tokens"], m["from"]) for m in plan["members"]
                if m["from"] != "scratch"]
        names = {"forward": ["L1←L0 fwd 1M", "L3←L2 fwd 1M"],
                 "backward": ["L0←L1 bwd 1M", "L2←L3 bwd 1M"]}[plan["direction"]]
        assert read == [(n, 500_000, "checkpoint") for n in names]
    runs = grid(job, build_sweep(finetune_budgets=(200_000, 1_000_000), compute_plan_from="run"))
    assert [(t.layer, t.budget) for t in phases(runs)["plan"]] == [
        (1, 500_000), (3, 500_000), (0, 500_000), (2, 500_000)]
    # 40% = 400k: not a multiple of the 250k checkpoint interval, so no checkpoint holds it
    between = build_sweep(finetune_budgets=(1_000_000,), compute_plan_budget_fraction=0.4)
    assert len(phases(grid(job, between))["plan"]) == 4


def test_plan_trains_its_own_transfers_with_stop_at():
    """`sweep.stop_at`: a transfer trial may stop before the plan's budget, so neither its
    checkpoint there nor a transfer trial of that very budget is the plan's SAE: each plan
    transfer is a trained trial of its own, read at its end ("run"); the other trials keep their
    keys. Without `stop_at` the same grid reads them off the transfer trials."""
    job = build_job(train=TrainConfig(num_tokens=1_000_000, batch_size=4096,
                                      checkpoint_every_tokens=250_000))
    stop = StopConfig(normalized_ces=0.9)
    # plan budget 500k: a checkpoint of the 1M fine-tuning, and the 500k fine-tuning itself
    for budgets in ((200_000, 1_000_000), (500_000,)):
        fixed = grid(job, build_sweep(finetune_budgets=budgets))
        assert phases(fixed)["plan"] == []
        sweep = build_sweep(finetune_budgets=budgets, stop_at=stop)
        trials = grid(job, sweep)
        plan = phases(trials)["plan"]
        assert [(t.layer, t.source_layer, t.budget, t.trains) for t in plan] == [
            (1, 0, 500_000, True), (3, 2, 500_000, True), (0, 1, 500_000, True),
            (2, 3, 500_000, True)]
        assert [t.key for t in trials if t.phase != "plan"] == [t.key for t in fixed]
        assert len({t.key for t in trials}) == len(trials)  # none is a transfer trial's
        index = {t.key: t for t in trials}
        for p in compute_plan_summary(job, sweep, trials)["plans"]:
            read = [(index[m["key"]].phase, m["tokens"], m["from"]) for m in p["members"]
                    if m["from"] != "scratch"]
            assert read == [("plan", 500_000, "run")] * 2
        for p in compute_plan_summary(job, build_sweep(finetune_budgets=budgets), fixed)["plans"]:
            assert {m["from"] for m in p["members"]} == {
                "scratch", "checkpoint" if budgets[-1] > 500_000 else "run"}


def test_budget_plan_trials_are_runs_of_their_planned_tokens():
    """`sweep.run_budget_plan`: each planned SAE_{i<-j} starts from the scratch SAE of j and
    trains exactly its planned tokens; it is never a transfer trial (which may stop early), and
    a B.1 plan trial of the same setting is the same run (one key: trained once)."""
    job = build_job(train=TrainConfig(num_tokens=1_000_000, batch_size=4096,
                                      checkpoint_every_tokens=250_000))
    sweep = build_sweep(finetune_budgets=(500_000,), stop_at=StopConfig(normalized_ces=0.9),
                        run_budget_plan=True)
    trials = grid(job, sweep)
    base = base_digest(job, "fp")  # as `grid` keys them
    planned = budget_plan_trials(job, sweep, base, trials, {1: (0, 250_000), 3: (2, 500_000)})
    scratch = {t.layer: t.key for t in trials if t.phase == "scratch"}
    assert [(t.layer, t.source_layer, t.budget, t.depends_on, t.phase) for t in planned] == [
        (1, 0, 250_000, (scratch[0],), "budget_plan"), (3, 2, 500_000, (scratch[2],), "budget_plan")]
    transfer = {(t.layer, t.source_layer, t.budget): t.key for t in trials if t.phase == "transfer"}
    b1 = {(t.layer, t.source_layer, t.budget): t.key for t in trials if t.phase == "plan"}
    assert planned[1].key != transfer[3, 2, 500_000] and planned[1].key == b1[3, 2, 500_000]
    assert planned[0].name == "L1←L0 fwd plan 250k"
    with pytest.raises(ConfigError, match="sweep.run_budget_plan: got True, expected a "
                                          "sweep.stop_at.normalized_ces target"):
        build_sweep(run_budget_plan=True, stop_at=StopConfig(plateau_gain=0.01))


def test_plan_pairs_forward_and_backward():
    """Appendix B.1 on the paper's 12 layers: scratch on the even layers with SAE_{i<-i-1} on
    the odd ones, and scratch on the odd layers with SAE_{i<-i+1} on the even ones."""
    twelve = build_sweep(layers=tuple(range(12)))
    scratch, pairs = compute_plan_pairs(twelve, "forward")
    assert scratch == (0, 2, 4, 6, 8, 10) and pairs == tuple((i, i - 1) for i in range(1, 12, 2))
    scratch, pairs = compute_plan_pairs(twelve, "backward")
    assert scratch == (1, 3, 5, 7, 9, 11) and pairs == tuple((i, i + 1) for i in range(0, 11, 2))
    # an odd count: backward is forward's mirror, so every transfer stays SAE_{i<-i+1}
    five = build_sweep(layers=(0, 1, 2, 3, 4))
    assert compute_plan_pairs(five, "forward") == ((0, 2, 4), ((1, 0), (3, 2)))
    assert compute_plan_pairs(five, "backward") == ((0, 2, 4), ((1, 2), (3, 4)))
    # the layers of the sweep, not block indices: the neighbour is the adjacent sweep layer
    s = build_sweep(layers=(0, 2, 4), offsets=(2,), finetune_budgets=(200_000,))
    trials = grid(job=build_job(cache=CacheConfig(layers=(0, 2, 4))), sweep=s)
    assert [(t.layer, t.source_layer, t.direction) for t in phases(trials)["plan"]] == [
        (2, 0, "offset-2"), (2, 4, "offset+2")]


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(offsets=(0, 1)), "sweep.offsets"),
        (dict(offsets=(1, 1)), "sweep.offsets"),
        (dict(finetune_budgets=(0,)), "sweep.finetune_budgets"),
        (dict(finetune_budgets=()), "sweep.finetune_budgets"),
        (dict(layers=()), "sweep.layers"),
        (dict(layers=(2, 1)), "sweep.layers"),
        (dict(finetune_lr=0.0), "sweep.finetune_lr"),
        (dict(compute_plan_budget_fraction=1.5), "sweep.compute_plan_budget_fraction"),
        (dict(compute_plan_directions=()), "sweep.compute_plan_directions"),
        (dict(compute_plan_directions=("forward", "forward")), "sweep.compute_plan_directions"),
        (dict(max_failures=-1), "sweep.max_failures"),
    ],
)
def test_sweep_config_errors(overrides, field):
    with pytest.raises(ConfigError, match=field):
        build_sweep(**overrides)


@pytest.mark.parametrize(
    "job_over, sweep_over, field",
    [
        (dict(cache=CacheConfig(layers=(0, 1, 2))), {}, "sweep.layers"),
        ({}, dict(site="resid_pre"), "sweep.site"),
        ({}, dict(offsets=(7,)), "sweep.offsets"),
        ({}, dict(finetune_budgets=(100,)), "sweep.finetune_budgets"),
        ({}, dict(compute_plan_budget_fraction=0.001), "sweep.compute_plan_budget_fraction"),
    ],
)
def test_grid_errors(job_over, sweep_over, field):
    with pytest.raises(ConfigError, match=field):
        grid(job=build_job(**job_over), sweep=build_sweep(**sweep_over))


def test_sweep_round_trips_in_job():
    job = dataclasses.replace(build_job(), sweep=build_sweep())
    data = to_dict(job)
    assert data["sweep"]["offsets"] == [-1, 1]
    assert from_dict(JobConfig, data) == job
    with pytest.raises(ConfigError, match="sweep.offsets"):
        from_dict(JobConfig, {**data, "sweep": {**data["sweep"], "offsets": [0]}})
    assert data["sweep"]["compute_plan_directions"] == ["forward", "backward"]
    assert data["sweep"]["compute_plan_from"] == "checkpoint"
    for field, bad in (("compute_plan_from", "later"), ("compute_plan_directions", ["sideways"])):
        with pytest.raises(ConfigError, match=f"sweep.{field}"):
            from_dict(JobConfig, {**data, "sweep": {**data["sweep"], field: bad}})


def test_references_are_the_scratch_and_zero_shot_trials_a_transfer_is_measured_against():
    trials = grid()
    refs = references(trials)
    by_key = {t.key: t for t in trials}
    assert sorted(refs.scratch) == list(LAYERS) and len(refs.zero_shot) == len(LAYERS) ** 2
    for t in trials:
        if t.phase not in ("transfer", "plan"):
            continue
        scratch, zero_shot = (by_key[k] for k in refs.of(t))
        assert (scratch.phase, scratch.layer) == ("scratch", t.layer)
        assert (zero_shot.phase, zero_shot.layer, zero_shot.source_layer) == (
            "zeroshot", t.layer, t.source_layer)
        assert zero_shot.depends_on == t.depends_on  # the same source SAE, read zero-shot
    # a grid without the layer has no reference there
    outside = dataclasses.replace(trials[0], layer=9, source_layer=0)
    assert refs.of(outside) == (None, None)
