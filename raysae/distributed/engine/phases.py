"""A phase's training on Ray: one Tune experiment whose trials are groups (`tune_phase`: each
trial drives one Fit; `run_groups` retries a failed group's members one by one), the plan a
sweep logs, and its result. The order of phases and their dependencies are the study's
(`distributed/study.py`); a phase reports (done, errors) by trial key."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune

from raysae.config import JobConfig
from raysae.costs import PhaseCost, cost_report
from raysae.distributed import root_cause
from raysae.distributed.engine.faults import parts, retry_plan
from raysae.distributed.engine.launch import TRIAL_CPUS, WORKER_CPUS, in_trial, trial_resources
from raysae.distributed.engine.specs import FitResult
from raysae.distributed.preflight import check_node, preflight_ran
from raysae.tracking import Tracker, job_tracking_uri

log = logging.getLogger("raysae.engine")

SQLITE_CONCURRENT_TRIALS = 2
"""Trials at once against a sqlite MLflow store, which serialises its writers."""
MEMBER_FAILED = "diverged"
"""How a phase reports a member that failed on its own while its group went on."""

Done = dict[str, dict[str, float]]
"""Trial key -> its final metrics."""
Errors = dict[str, str]
"""Trial key -> why it did not finish."""


def log_costs(tracker: Tracker, parent: str, job: JobConfig, why: str,
             phases: Sequence[PhaseCost]) -> None:
    """Print a sweep's costs (the table `raysae plan` prints) and keep them on its parent run
    (`plan.json`, source tags)."""
    log.info("plan:\n%s", cost_report(job, why, phases))
    tracker.log_dict(parent, {"source": job.train.source, "why": why,
                              "phases": [dataclasses.asdict(p) for p in phases]}, "plan.json")
    tracker.set_tags(parent, {"raysae.source": job.train.source, "raysae.source_why": why[:250]})


@dataclass(frozen=True)
class SweepResult:
    """What a sweep gives its caller once its phases have run."""

    parent_run: str
    """MLflow run id of the sweep."""
    finished: Done
    """Trial key -> final metrics, for every trial that completed."""
    failed: Errors
    """Trial key -> why it did not complete (its error, or the failed trial it needed)."""
    summary: dict[str, Any]
    """The sweep's summary (counts, and what each study adds)."""


def _tune_trial(config: dict[str, Any], run_group: Callable[..., dict[str, FitResult]],
                payload: dict, checked: JobConfig | None) -> None:
    """A Tune function trainable: one trial drives one Fit (a group; one of one worker it runs
    itself, `launch.in_trial`) and reports the final metrics of each of its members. After a
    preflight (`checked`: its job), a node that joined later is checked first (`check_node`)."""
    if checked is not None:
        check_node(checked)
    with in_trial():
        results = run_group(config["key"], **payload)
    members = {k: {"metrics": r.metrics, "out_dir": str(r.out_dir), "error": r.error}
               for k, r in results.items()}
    tune.report({"members": json.dumps(members)})


def final_metrics(values: dict[str, Any]) -> dict[str, float]:
    """What a phase reports of a member's final metrics: the evaluation metrics (a '/' in
    their name: eval/..., ce/...) and `flops`."""
    return {k: v for k, v in values.items()
            if ("/" in k or k == "flops") and isinstance(v, int | float)}


def tune_phase(
    job: JobConfig,
    experiment: str,
    groups: dict[str, list[str]],
    run_group: Callable[..., dict[str, FitResult]],
    payload: dict[str, Any],
    max_failures: int,
) -> tuple[Done, Errors]:
    """One Tune experiment whose trials are groups (a grid search on the group "key"),
    restored when it already exists; `run_group(group_key, **payload)` fits a group and returns
    its members' results. Returns, per member key, the metrics with a '/' in their name
    (eval/..., ce/...) and `flops`, or the root cause of its group's failure. A group without
    members (all settled before the phase) is not a trial; restored, it reports nothing; a
    phase without any runs no Tune experiment."""
    storage = Path(job.runs_dir).resolve() / "tune"
    trainable = tune.with_resources(
        tune.with_parameters(_tune_trial, run_group=run_group, payload=payload,
                             checked=job if preflight_ran(job) else None),
        trial_resources(job),
    )
    path = storage / experiment
    todo = [k for k, members in groups.items() if members]
    if not todo:  # every member settled before the phase: not even a restored experiment to run
        return {}, {}
    if tune.Tuner.can_restore(path):
        log.info("restoring Tune experiment %s", path)
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"key": tune.grid_search(todo)},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent_fits(job)),
            run_config=tune.RunConfig(
                name=experiment,
                storage_path=str(storage),
                failure_config=tune.FailureConfig(max_failures=max_failures),
                verbose=1,
            ),
        )
    done: Done = {}
    errors: Errors = {}
    for result in tuner.fit():
        members = groups.get(result.config["key"], [])
        if result.error is not None:
            errors |= {k: f"failed: {root_cause(result.error)}" for k in members}
        elif result.metrics and "members" in result.metrics:
            for key, r in json.loads(result.metrics["members"]).items():
                if r["error"] is not None:
                    errors[key] = f"{MEMBER_FAILED}: {r['error']}"
                    continue
                done[key] = final_metrics(r["metrics"])
        else:
            errors |= {k: "failed: the trial reported no result" for k in members}
    return done, errors


def run_groups(
    job: JobConfig,
    experiment: str,
    specs: dict[str, Any],
    run_group: Callable[..., dict[str, FitResult]],
    extra: dict[str, Any],
    max_failures: int,
    members_of: Callable[[Any], list[str]],
    regroup: Callable[[Any, list[list[int]]], dict[str, Any]],
) -> tuple[Done, Errors]:
    """Run a phase's groups (`tune_phase`, `run_group(key, groups=specs, **extra)`); each
    failure is told apart (`faults`): a group that failed on a member's own data is split and
    its members retried one per group, so that the SAEs that shared its stream go on; one that
    ran out of memory is halved, and a half that still fails halved again (`regroup(spec,
    parts)`: the spec's members in those parts, by key); an infrastructure fault (storage,
    tracking, network) is not split, Tune having retried the whole group from its last
    checkpoint; a misconfiguration stops the sweep. Retry round r is Tune experiment
    `<experiment>-retry<r>`."""
    groups = {k: members_of(spec) for k, spec in specs.items()}
    done, errors = tune_phase(job, experiment, groups, run_group, {"groups": specs, **extra},
                              max_failures)
    split, errors = retry_plan(experiment, errors, groups, MEMBER_FAILED)
    round_ = 0
    while split:
        specs = {k: part for key, kind in split.items()
                 for k, part in regroup(specs[key], parts(len(groups[key]), kind)).items()}
        round_ += 1
        log.info("%s: retry %d: %s; re-planned as %d group(s) of %s SAEs", experiment, round_,
                 ", ".join(f"{k} ({kind})" for k, kind in split.items()), len(specs),
                 "/".join(str(len(members_of(s))) for s in specs.values()))
        groups = {k: members_of(spec) for k, spec in specs.items()}
        more, still = tune_phase(job, f"{experiment}-retry{round_}", groups, run_group,
                                 {"groups": specs, **extra}, max_failures)
        split, still = retry_plan(experiment, still, groups, MEMBER_FAILED)
        done |= more
        errors = {k: v for k, v in errors.items() if k not in more} | still
    return done, errors


def concurrent_fits(job: JobConfig) -> int:
    """Fits at once (logged with why): as many Train worker groups as the cluster can grow to
    hold (`cluster_capacity`), each with its driving trial; at most SQLITE_CONCURRENT_TRIALS
    against a sqlite MLflow store."""
    n, why = fits_at_once(job, *cluster_capacity())
    log.info("%d group(s) at once: %s", n, why)
    return n


def fits_at_once(job: JobConfig, resources: dict[str, float], source: str) -> tuple[int, str]:
    """Groups that `resources` (read from `source`) hold at once, and why."""
    workers = job.train.num_workers
    if job.train.use_gpu:
        n = int(resources.get("GPU", 0) // workers)
        why = f"{resources.get('GPU', 0):g} GPUs / {workers} per group"
    else:
        n = int(resources.get("CPU", 1) // (WORKER_CPUS * workers + TRIAL_CPUS))
        why = f"{resources.get('CPU', 1):g} CPUs / {WORKER_CPUS * workers + TRIAL_CPUS:g} per group"
    why += f", {source}"
    if job_tracking_uri(job).startswith("sqlite:") and n > SQLITE_CONCURRENT_TRIALS:
        n, why = SQLITE_CONCURRENT_TRIALS, f"{why}; at most {SQLITE_CONCURRENT_TRIALS} on a sqlite MLflow store"
    return max(1, n), why


AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"
"""Where `ray up` leaves the cluster's config on the head (its node types' resources filled in
from the instance types); RAYSAE_CLUSTER_CONFIG names another."""


def cluster_capacity(present: dict[str, float] | None = None) -> tuple[dict[str, float], str]:
    """The resources the cluster can grow to, and where they were read: the autoscaler's
    configured maximum, not what is up when a phase starts (a cluster at `min_workers: 0` has
    no GPU then); without an autoscaler config, what is present (`ray.cluster_resources()`)."""
    present = ray.cluster_resources() if present is None else present
    path = Path(os.environ.get("RAYSAE_CLUSTER_CONFIG", AUTOSCALER_CONFIG)).expanduser()
    if not path.is_file():
        return present, "the resources present now (no autoscaler config)"
    most = autoscaler_max(yaml.safe_load(path.read_text()))
    grown = {k: max(most.get(k, 0.0), present.get(k, 0.0)) for k in {*most, *present}}
    return grown, f"the autoscaler's maximum in {path}"


def autoscaler_max(cluster: dict[str, Any]) -> dict[str, float]:
    """The resources of a cluster launcher config at its maximum: the head's, and each worker
    node type's times its `max_workers`, the cluster's `max_workers` capping the workers (the
    node types with the most GPUs counted first)."""
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    total = {k: float(v) for k, v in types[head].get("resources", {}).items()}
    left = cluster.get("max_workers", float("inf"))
    workers = sorted((t for name, t in types.items() if name != head),
                     key=lambda t: -t.get("resources", {}).get("GPU", 0))
    for t in workers:
        n = min(t.get("max_workers", 0), left)
        left -= n
        for k, v in t.get("resources", {}).items():
            total[k] = total.get(k, 0.0) + n * v
    return total
