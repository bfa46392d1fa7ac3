"""The cheapest plan read off a pilot sweep's runs (`raysae.transfer.pilot`), without Ray or
MLflow: fabricated runs behind the `RunReader` protocol; and `raysae plan --target`, which
imports no ray."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from conftest import TINY_NEOX

from raysae.config import (
    CacheConfig,
    ConfigError,
    DataConfig,
    JobConfig,
    ModelConfig,
    SweepConfig,
    TrainConfig,
)
from raysae.transfer import grid
from raysae.transfer.pilot import (
    budget_plan_report,
    budget_plan_run_summary,
    read_pilot,
    sweep_trials,
    undefined_pairs,
)


class FakeRuns:
    """Runs by key: status, final metrics and metric histories (what a Tracker reads)."""

    def __init__(self) -> None:
        self.runs: dict[str, dict] = {}

    def add(self, key: str, metrics: dict[str, float] | None = None,
            history: dict[str, list[tuple[int, float]]] | None = None,
            status: str = "FINISHED") -> None:
        self.runs[key] = {"status": status, "metrics": metrics or {}, "history": history or {}}

    def find(self, key: str) -> str | None:
        return key if key in self.runs else None

    def status(self, run_id: str) -> str:
        return self.runs[run_id]["status"]

    def finished_metrics(self, key: str) -> dict[str, float] | None:
        run = self.runs.get(key)
        return run["metrics"] if run and run["status"] == "FINISHED" else None

    def history(self, run_id: str, metric: str) -> list[tuple[int, float]]:
        return list(self.runs[run_id]["history"].get(metric, []))


def pilot_job() -> JobConfig:
    return JobConfig(
        name="pilot", model=ModelConfig(name="tiny"),
        data=DataConfig(source="tokens.parquet", context_length=16, num_tokens=512),
        cache=CacheConfig(layers=(0, 1)), train=TrainConfig(num_tokens=2000, batch_size=100),
        sweep=SweepConfig(layers=(0, 1), finetune_budgets=(1000,), compute_plan=False),
    )


def pilot_runs(job: JobConfig, zero_shot_1_from_0: float = 0.4) -> tuple[list[grid.Trial], FakeRuns]:
    """Scratch CES 0.9 (L0) and 0.8 (L1); L1<-L0 reaches 0.95 at 1000 tokens, L0<-L1 at 500."""
    trials = grid.expand(job, job.sweep, "fp")
    runs = FakeRuns()
    scratch_ces = {0: 0.9, 1: 0.8}
    zero_shot = {(0, 1): 0.5, (1, 0): zero_shot_1_from_0}
    curves = {(1, 0): [(500, 0.6), (1000, 0.97)], (0, 1): [(500, 0.99), (1000, 1.0)]}
    for t in trials:
        if t.phase == "scratch":
            runs.add(t.key, {"eval/ces": scratch_ces[t.layer]})
        elif t.phase == "zeroshot":
            ces = scratch_ces[t.layer] if t.layer == t.source_layer else zero_shot[(t.layer, t.source_layer)]
            runs.add(t.key, {"eval/ces": ces})
        else:
            runs.add(t.key, history={"normalized_ces": curves[(t.layer, t.source_layer)]})
    return trials, runs


def test_pilot_finds_the_cheapest_plan_on_the_runs():
    job = pilot_job()
    trials, runs = pilot_runs(job)
    pilot = read_pilot(job, 0.95, trials, runs)
    assert pilot.scratch == {0: 2000, 1: 2000} and pilot.undefined == []
    assert pilot.curves == {(1, 0): [[(500, 0.6), (1000, 0.97)]], (0, 1): [[(500, 0.99), (1000, 1.0)]]}
    # scratch on 1 and 0<-1 at 500 tokens (2,500) beats scratch on 0 and 1<-0 at 1,000 (3,000)
    assert pilot.best.scratch == (1,) and pilot.best.transfers == {0: (1, 500)}
    assert pilot.best.tokens == 2500 and pilot.best.scratch_everywhere == 4000
    text = budget_plan_report(job, 0.95, trials, runs)
    assert "  scratch on [1]; L0<-L1 500" in text
    assert "| cheapest for the target | 2,500 | 38% | >= 0.95 |" in text
    assert "| scratch everywhere | 4,000 | 0% | 1 |" in text
    # the forward B.1 plan (scratch on 0, 1<-0) at 1,000 tokens: 0.97 at its checkpoint there
    assert "| B.1 forward, 1k fine-tuning | 3,000 | 25% | 0.970 (meets the target) |" in text
    assert "not used" not in text


def test_a_pair_whose_zero_shot_beats_scratch_is_not_used():
    job = pilot_job()
    trials, runs = pilot_runs(job, zero_shot_1_from_0=0.85)  # above L1's scratch CES 0.8
    assert undefined_pairs(trials, runs) == [(1, 0)]
    pilot = read_pilot(job, 0.95, trials, runs)
    assert (1, 0) not in pilot.curves and pilot.undefined == [(1, 0)]
    text = budget_plan_report(job, 0.95, trials, runs)
    assert "not used (normalized CES undefined" in text and "L1<-L0" in text
    assert "| B.1 forward, 1k fine-tuning | 3,000 | 25% | undefined at L1<-L0 |" in text


def test_a_pilot_without_its_scratch_runs_is_refused():
    job = pilot_job()
    trials, runs = pilot_runs(job)
    scratch = next(t for t in trials if t.phase == "scratch")
    runs.runs[scratch.key]["status"] = "RUNNING"
    with pytest.raises(ConfigError, match="has no finished run in experiment 'pilot'"):
        read_pilot(job, 0.95, trials, runs)


def test_plan_run_summary_reads_each_planned_run_at_its_tokens():
    job = pilot_job()
    trials, runs = pilot_runs(job)
    pilot = read_pilot(job, 0.95, trials, runs)
    planned = grid.budget_plan_trials(job, job.sweep, "fp", trials, pilot.best.transfers)
    assert [(t.layer, t.source_layer, t.budget) for t in planned] == [(0, 1, 500)]
    runs.add(planned[0].key, history={"normalized_ces": [(250, 0.5), (500, 0.93)]})
    out = budget_plan_run_summary(runs, pilot, planned)
    assert out["transfers"] == [{"layer": 0, "source": 1, "tokens": 500, "key": planned[0].key,
                                 "normalized_ces": 0.93, "meets": False}]
    assert not out["all_met"] and out["tokens"] == 2500 and out["scratch_layers"] == [1]
    assert "0 of 1 transfers reach normalized CES >= 0.95 when run" in out["text"]
    assert "| 0 | 1 | 500 | 0.930 | no |" in out["text"]


def test_sweep_trials_need_a_sweep():
    job = pilot_job()
    with pytest.raises(ConfigError, match="no sweep section"):
        sweep_trials(JobConfig(name=job.name, model=job.model, data=job.data, cache=job.cache))


def test_plan_target_imports_no_ray(tmp_path, token_file):
    """`raysae plan --target` reads MLflow only: in a fresh process it never imports ray (here
    it finds no finished sweep and says so)."""
    cfg = {"name": "pilot-cli", "model": {"name": "tiny-neox", "from_config": TINY_NEOX},
           "data": {"source": str(token_file), "context_length": 16, "num_tokens": 512},
           "cache": {"layers": [0, 1]},
           "train": {"num_tokens": 2048, "batch_size": 256, "data_passes": 4},
           "sweep": {"layers": [0, 1], "finetune_budgets": [1024], "compute_plan": False}}
    path = tmp_path / "pilot.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = ("import sys; from raysae.cli import main; "
            f"rc = main(['plan', {str(path)!r}, '--target', '0.5', '--runs-dir', {str(tmp_path / 'runs')!r}]); "
            "assert rc == 2, rc; assert 'ray' not in sys.modules, 'ray imported'")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "L0 scratch has no finished run in experiment 'pilot-cli'" in out.stderr
