"""Adaptive budgets through Ray Tune (`sweep.stop_at`): each transfer stops at its target, the
cheapest plan for the target runs as a phase, and a re-submitted sweep with another target
re-decides only what the target changes. Its own file: a sweep of its own, run beside the first
(`make test` runs a file's tests on one xdist worker)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import driver_env
from mlflow.tracking import MlflowClient
from test_sweep import CONFIG, runs_table_named, sweep_cmd

from raysae.config import load_config

pytestmark = pytest.mark.ray


def adaptive_config(token_file, target: float | None) -> dict:
    stop = {} if target is None else {"stop_at": {"normalized_ces": target, "check_every_tokens": 256},
                                      "run_budget_plan": True}
    return {**CONFIG, "name": "sweep-adaptive",  # streamed: no caching pass
            "data": {**CONFIG["data"], "source": str(token_file)},
            "train": {**CONFIG["train"], "source": "streamed"},
            "sweep": {**CONFIG["sweep"], **stop}}  # the B.1 plans priced on the curves alone


def submit(cfg: dict, cfg_path: Path, runs: Path) -> str:
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(sweep_cmd(cfg_path, runs), env=driver_env(), capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def adaptive(tmp_path_factory, token_file):
    tmp = tmp_path_factory.mktemp("adaptive")
    cfg_path, runs = tmp / "sweep.yaml", tmp / "runs"
    return cfg_path, runs, submit(adaptive_config(token_file, 0.3), cfg_path, runs)


def transfer_runs(runs: Path) -> dict[str, dict]:
    """The live transfer runs by key: run id, tokens, stop reason, normalized CES by step (each
    step once), the final SAE's bytes."""
    from raysae.distributed.engine import STOP_TAG
    from raysae.distributed.training import sae_dir_for

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    job = dataclasses.replace(load_config(runs.parent / "sweep.yaml"), runs_dir=str(runs))
    out = {}
    for row in runs_table_named(runs, "sweep-adaptive").filter(
            pl.col("tags.raysae.phase") == "transfer").iter_rows(named=True):
        key = row["tags.raysae.run_key"]
        history = [(m.step, m.value) for m in client.get_metric_history(row["run_id"], "normalized_ces")]
        assert len({s for s, _ in history}) == len(history), f"{key}: a step logged twice"
        out[key] = {"run_id": row["run_id"], "tokens": int(row["tags.raysae.tokens_seen"]),
                    "why": row[f"tags.{STOP_TAG}"], "norm": dict(history),
                    "sae": {f.name: f.read_bytes() for f in sorted(sae_dir_for(job, key).iterdir())}}
    return out


def test_adaptive_sweep_stops_each_transfer_at_its_target(adaptive):
    """`sweep.stop_at`: each transfer stops at the first check (every 256 tokens) whose
    normalized CES reaches the target, or runs its budget below it, and says which; the sweep
    prints the tokens saved and the cheapest plan for the target against the B.1 plans, which
    `raysae plan --target` prints again from MLflow."""
    cfg_path, runs, stdout = adaptive
    target, stopped = 0.3, 0
    for run in transfer_runs(runs).values():
        tokens, why, norm = run["tokens"], run["why"], run["norm"]
        if why.startswith("no target: normalized CES is undefined here"):  # zero-shot >= scratch
            assert tokens == 2048 and sorted(norm) == [1024, 2048]  # no checks: checkpoints only
            continue
        assert sorted(norm) == list(range(256, tokens + 1, 256))  # a check every 256 tokens
        assert all(v < target for s, v in norm.items() if s < tokens)
        if why.startswith("target: eval/ces"):
            assert norm[tokens] >= target - 1e-9
            stopped += tokens < 2048
        else:
            assert why.startswith("budget:") and tokens == 2048 and norm[tokens] < target
    assert stopped >= 1, "no transfer reached the target early: the test says nothing"
    assert "early stopping: " in stdout and "transfers stopped early" in stdout
    assert "| cheapest for the target |" in stdout and "| B.1 forward, 1024 fine-tuning |" in stdout
    # `raysae plan --target` prints the same plan, read back from MLflow
    from raysae.tracking import Tracker, tracking_uri
    from raysae.transfer.pilot import budget_plan_report, sweep_trials

    job = dataclasses.replace(load_config(cfg_path), runs_dir=str(runs))
    pilot_runs = Tracker(tracking_uri(job.runs_dir), job.name)
    assert budget_plan_report(job, target, sweep_trials(job), pilot_runs) in stdout

    # the plan run as a phase: each planned transfer a run of exactly its planned tokens, its
    # normalized CES at the end reported as MLflow has it
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    [parent] = runs_table_named(runs, "sweep-adaptive").filter(
        pl.col("tags.raysae.phase") == "sweep")["run_id"]
    summary = json.loads(Path(client.download_artifacts(parent, "sweep_summary.json",
                                                        str(runs.parent))).read_text())
    plan = summary["budget_plan_run"]
    assert plan["transfers"] and plan["text"] in stdout
    for row in plan["transfers"]:
        [run] = client.search_runs([client.get_experiment_by_name("sweep-adaptive").experiment_id],
                                   filter_string=f"tags.`raysae.run_key` = '{row['key']}'")
        assert run.data.tags["raysae.tokens_seen"] == str(row["tokens"]) and not run.data.tags.get("raysae.stop")
        norm = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "normalized_ces")}
        assert norm[row["tokens"]] == row["normalized_ces"]
        assert row["meets"] == (row["normalized_ces"] >= target - 1e-9)


def test_a_changed_target_redecides_only_what_it_changes(adaptive, token_file):
    """Re-submitted without a target, the transfers that stopped at it train on to their budget
    from the state kept at their stop (the checks before kept, each step logged once); the
    others stay as they were. Back at the target, every transfer ends exactly where and as it
    first ended, read off the longer training: nothing is trained, no checkpoint written, and
    each replaced run is deleted in MLflow with its replacement named."""
    from raysae.tracking import SUPERSEDED_TAG

    cfg_path, runs, _ = adaptive
    first = transfer_runs(runs)
    submit(adaptive_config(token_file, None), cfg_path, runs)
    second = transfer_runs(runs)
    went_on = 0
    for key, a in first.items():
        b = second[key]
        if not a["why"].startswith("target:") or a["tokens"] == 2048:  # ran its budget
            assert (b["run_id"], b["tokens"], b["norm"]) == (a["run_id"], a["tokens"], a["norm"])
            continue
        went_on += 1
        assert b["run_id"] == a["run_id"] and b["tokens"] == 2048  # its own run, gone on
        assert b["why"] == "budget: no stop rule, the budget of 2,048 tokens ran"
        # the checks it stopped by, then its checkpoints (no checks without a rule)
        assert sorted(b["norm"]) == [*range(256, a["tokens"] + 1, 256), 1024, 2048]
        assert all(b["norm"][s] == v for s, v in a["norm"].items())
    assert went_on >= 1, "no transfer stopped early: the test says nothing"

    def written():
        return {(p, p.stat().st_mtime_ns) for p in (runs / "checkpoints").rglob("*") if p.is_file()}

    before = written()
    submit(adaptive_config(token_file, 0.3), cfg_path, runs)
    third = transfer_runs(runs)
    assert written() == before, "a checkpoint was trained again"
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    for key, a in first.items():
        c = third[key]
        assert (c["tokens"], c["why"], c["norm"], c["sae"]) == (a["tokens"], a["why"], a["norm"], a["sae"])
        if c["run_id"] != second[key]["run_id"]:
            old = client.get_run(second[key]["run_id"])
            assert old.info.lifecycle_stage == "deleted" and old.data.tags[SUPERSEDED_TAG] == c["run_id"]
