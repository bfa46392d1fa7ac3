"""The cheapest plan for a target from a finished (pilot) sweep, read off its runs, and the
tables that report it (`raysae plan --target`, the sweep's summary, the plan run as a phase).

A pilot sweep's runs say what each layer's scratch SAE cost and each transfer's normalized-CES
curve; `raysae.transfer.budget_plan` finds the cheapest plan on them. The runs are read through
a `RunReader` (the sweep's `tracking.Tracker` is one), so that this module imports neither ray
nor mlflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from raysae.activations import fingerprint
from raysae.config import ConfigError, JobConfig
from raysae.transfer import budget_plan, grid, scores


class RunReader(Protocol):
    """What the pilot reads of a sweep's runs (`tracking.Tracker` reads them from MLflow)."""

    def find(self, key: str) -> str | None: ...

    def status(self, run_id: str) -> str: ...

    def finished_metrics(self, key: str) -> dict[str, float] | None: ...

    def history(self, run_id: str, metric: str) -> list[tuple[int, float]]: ...


@dataclass(frozen=True)
class Pilot:
    """What a finished (pilot) sweep says about a target: the scratch budgets, each defined
    pair's normalized-CES curves, the pairs where it is undefined, and the cheapest plan."""

    target: float
    scratch: dict[int, int]
    curves: dict[tuple[int, int], list[budget_plan.Curve]]
    undefined: list[tuple[int, int]]
    best: budget_plan.BudgetPlan


def sweep_trials(job: JobConfig) -> list[grid.Trial]:
    """The trials of the job's sweep as its config declares them (what `raysae plan --target`
    reads the runs of)."""
    sweep = job.sweep
    if sweep is None:
        raise ConfigError("plan --target: the config has no sweep section")
    return grid.expand(job, sweep, grid.base_digest(job, fingerprint(job)))


def undefined_pairs(trials: list[grid.Trial], runs: RunReader) -> list[tuple[int, int]]:
    """(target, source) of the transfers whose normalized CES is undefined: a reference did not
    finish, or the source read zero-shot is no worse than the scratch SAE."""
    refs = grid.references(trials)
    ces: dict[str | None, float | None] = {None: None}

    def ces_of(key: str | None) -> float | None:
        if key not in ces:
            ces[key] = (runs.finished_metrics(key) or {}).get("eval/ces")  # type: ignore[arg-type]
        return ces[key]

    out = set()
    for t in trials:
        if t.phase in ("transfer", "plan"):
            s, z = (ces_of(k) for k in refs.of(t))
            if None in (z, s) or not scores.normalized_ces_defined(z, s):  # type: ignore[arg-type]
                out.add((t.layer, t.source_layer))
    return sorted(out)  # type: ignore[arg-type]


def read_pilot(job: JobConfig, target: float, trials: list[grid.Trial], runs: RunReader) -> Pilot:
    """The cheapest scratch/transfer plan reaching normalized CES >= `target` on every layer
    (`raysae.transfer.budget_plan`), from the finished runs of `trials`."""
    scratch: dict[int, int] = {}
    curves: dict[tuple[int, int], list[budget_plan.Curve]] = {}
    undefined = undefined_pairs(trials, runs)
    for t in trials:  # a B.1 plan's own run is a transfer run of its pair too
        if t.phase not in ("scratch", "transfer", "plan"):
            continue
        run_id = runs.find(t.key)
        if run_id is None or runs.status(run_id) != "FINISHED":
            if t.phase == "scratch":
                raise ConfigError(f"plan --target: {t.name} has no finished run in experiment "
                                  f"'{job.name}' under {job.runs_dir}; run the sweep first")
            continue
        if t.phase == "scratch":
            scratch[t.layer] = t.budget
        elif (t.layer, t.source_layer) not in undefined:
            curve = sorted(dict(runs.history(run_id, "normalized_ces")).items())
            curves.setdefault((t.layer, t.source_layer), []).append(curve)  # type: ignore[arg-type]
    best = budget_plan.cheapest_budget_plan(scratch, budget_plan.transfer_costs(curves, target))
    return Pilot(target, scratch, curves, undefined, best)


def budget_plan_report(job: JobConfig, target: float, trials: list[grid.Trial], runs: RunReader) -> str:
    """`raysae plan CONFIG --target T`: the cheapest plan for the target (`read_pilot`) from the
    runs of the job's finished sweep (`trials`: its trials), against scratch everywhere and the
    fixed Appendix B.1 plans on the same curves."""
    sweep = job.sweep
    assert sweep is not None
    pilot = read_pilot(job, target, trials, runs)
    best, undefined = pilot.best, pilot.undefined
    everywhere = best.scratch_everywhere
    lines = [f"plan for normalized CES >= {target:g} on layers {list(sweep.layers)} (from the "
             f"checkpoints of experiment '{job.name}'):",
             f"  scratch on {list(best.scratch)}; "
             + ", ".join(f"L{i}<-L{j} {grid.format_tokens(n)}" for i, (j, n) in
                         sorted(best.transfers.items())),
             *(["  not used (normalized CES undefined: the zero-shot CES is at least the "
                "scratch SAE's): " + ", ".join(f"L{i}<-L{j}" for i, j in undefined)]
               if undefined else []),
             "", "| plan | tokens | saved vs scratch everywhere | worst normalized CES |",
             "|---|---|---|---|",
             f"| cheapest for the target | {best.tokens:,} | {best.saving:.0%} | >= {target:g} |",
             f"| scratch everywhere | {everywhere:,} | 0% | 1 |"]
    return "\n".join(lines + _compute_plan_rows(job, pilot))


def _compute_plan_rows(job: JobConfig, pilot: Pilot) -> list[str]:
    """The Appendix B.1 plans priced on the pilot's curves, a table row each."""
    sweep = job.sweep
    assert sweep is not None
    rows = []
    for direction in ("forward", "backward"):
        layers, pairs = grid.compute_plan_pairs(sweep, direction)
        for budget in sorted({*sweep.finetune_budgets, grid.compute_plan_budget(job, sweep)}):
            tokens, worst = budget_plan.price_compute_plan(list(sweep.layers), pilot.scratch, pilot.curves,
                                                   list(layers), dict(pairs), budget)
            bad = [f"L{i}<-L{j}" for i, j in pairs if (i, j) in pilot.undefined]
            meets = (f"undefined at {', '.join(bad)}" if bad else
                     "not measured: no run of its transfers has a checkpoint there (stopped before)"
                     if worst != worst else
                     f"{worst:.3f} ({'meets' if worst >= pilot.target else 'misses'} the target)")
            rows.append(f"| B.1 {direction}, {grid.format_tokens(budget)} fine-tuning | "
                        f"{tokens:,} | {1 - tokens / pilot.best.scratch_everywhere:.0%} | {meets} |")
    return rows


def budget_plan_run_summary(runs: RunReader, pilot: Pilot, planned: list[grid.Trial]) -> dict[str, Any]:
    """The plan run as a phase (`sweep.run_budget_plan`): each planned transfer's normalized
    CES at the end of its own run of the planned tokens, against the target its plan was read
    for (off checkpoints of longer runs, whose schedules differ)."""
    rows = []
    for t in planned:
        run_id = runs.find(t.key)
        value = dict(runs.history(run_id, "normalized_ces")).get(t.budget) if run_id else None
        rows.append({"layer": t.layer, "source": t.source_layer, "tokens": t.budget, "key": t.key,
                     "normalized_ces": value,
                     "meets": value is not None and value >= pilot.target - 1e-9})
    best = pilot.best
    lines = [f"the plan run as a phase (each transfer a run of exactly its planned tokens, with "
             f"its own schedule): scratch on {list(best.scratch)}, {best.tokens:,} tokens "
             f"({best.saving:.0%} saved against scratch everywhere); "
             f"{sum(r['meets'] for r in rows)} of {len(rows)} transfers reach normalized CES >= "
             f"{pilot.target:g} when run"]
    if rows:
        lines += ["", "| layer | from | tokens | normalized CES at the end | target met |",
                  "|---|---|---|---|---|"]
    for r in rows:
        value = "n/a" if r["normalized_ces"] is None else f"{r['normalized_ces']:.3f}"
        lines.append(f"| {r['layer']} | {r['source']} | {r['tokens']:,} | {value} | "
                     f"{'yes' if r['meets'] else 'no'} |")
    return {"target": pilot.target, "scratch_layers": list(best.scratch), "tokens": best.tokens,
            "saved_fraction": best.saving, "transfers": rows,
            "all_met": all(r["meets"] for r in rows), "text": "\n".join(lines)}
