"""The engine both sweeps run on: the Ray Train launch, the worker skeleton, Tune phases, the
phase runner and the Ray-task fan-out, each once.

A `Fit` is what one Ray Train run trains, seen from one worker: a group of members (SAEs of
several layers, widths and budgets; or one stitch) that read one data stream, each with its own
MLflow run, budget, checkpoints and final artefact. `fit_on_ray` launches it, and `_worker` is
the same skeleton for every Fit:

    resume the last committed group state -> build the unfinished members -> this worker's
    stream from where it stopped -> open (or continue) each member's MLflow run on rank 0 ->
    step every unfinished member on each batch; a member that reaches its budget leaves the
    group (its final artefact saved, its run finished); commit a group checkpoint whenever a
    member's checkpoint is due -> until every member is done.

A Ray Train run is named after its group's stable key, so a worker that dies (or a driver that
is restarted) resumes from the last committed checkpoint: every unfinished member from its own
state at that step, finished members not at all, and their MLflow runs found by key continue;
token budgets are met exactly either way. Each member's checkpoints are also kept as artefact
folders of their own (`<runs_dir>/checkpoints/<run>/tokens_<n>/`), for the evaluations that
follow a training.

A sweep is a list of `Phase`s over trials that name the trials they depend on (`run_phases`
skips the dependents of a failed trial); a phase runs its trials either as one Tune experiment
whose trials are groups (`tune_phase`: each trial drives one Fit) or as plain Ray tasks
(`fan_out`), and reports (done, errors) by trial key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import ray
import ray.train
import torch
import torch.distributed as dist
from ray import tune
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    CheckpointConsistencyMode,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from raysae.checkpoint import (
    TrainState,
    load_train_state,
    save_train_state,
    train_state_counters,
)
from raysae.config import JobConfig, digest, from_dict, to_dict
from raysae.distributed import root_cause
from raysae.plan import PhasePlan, plan_report
from raysae.stopping import StopRule, no_rule_reason, signature
from raysae.tracking import Tracker, tracking_uri
from raysae.train import Diverged, Trainer

log = logging.getLogger("raysae.engine")

WORKER_CPUS = 0.5
"""CPUs per Ray Train worker without a GPU: below one, so that on small nodes whole-CPU workers
do not starve Ray Data's read tasks and the other Ray tasks (RAY_NOTES: a hang, no error)."""
TRIAL_CPUS = 0.1
"""CPUs of a Tune trial, which only drives its Train run (its workers ask for their own)."""
RANK_SEED_STRIDE = 7919
"""Worker r shuffles its data with seed + r·stride (a prime: no two ranks share a seed)."""
SQLITE_CONCURRENT_TRIALS = 2
"""Trials at once against a sqlite MLflow store, which serialises its writers."""

Done = dict[str, dict[str, float]]
"""Trial key -> its final metrics."""
Errors = dict[str, str]
"""Trial key -> why it did not finish."""


def worker_seed(seed: int, rank: int) -> int:
    """The data-order seed of worker `rank`."""
    return seed + RANK_SEED_STRIDE * rank


def run_name_for(key: str) -> str:
    """A Ray Train run name derived only from the key: restarts find the same run directory."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return f"{safe[:80]}-{digest(key)}"


def train_runs_dir(job: JobConfig) -> Path:
    """Where Ray Train keeps every run's checkpoints (`<run name>/tokens_<n>/`)."""
    return Path(job.runs_dir).resolve() / "ray_train"


def output_dir(job: JobConfig, kind: str, key: str) -> Path:
    """Where the final artefact of the fit with this key is saved: `<runs_dir>/<kind>/<run>`."""
    return Path(job.runs_dir).resolve() / kind / run_name_for(key)


def checkpoints_dir(job: JobConfig, key: str) -> Path:
    """Where a member's checkpoint artefacts are kept: `<runs_dir>/checkpoints/<run>/`."""
    return Path(job.runs_dir).resolve() / "checkpoints" / run_name_for(key)


def stop_state_dir(job: JobConfig, key: str, tokens: int) -> Path:
    """Where the training state of a member that stopped at `tokens` is kept: beside that
    checkpoint's artefact, so that a re-submitted sweep with a higher target trains it on."""
    return checkpoints_dir(job, key) / f"tokens_{tokens:012d}" / "state"


def checkpoint_folders(job: JobConfig, key: str, artifact: str) -> list[tuple[int, Path]]:
    """(tokens seen, artefact folder) of every checkpoint of the member with this key, in order
    (`<runs_dir>/checkpoints/<run>/tokens_<n>/<artifact>`)."""
    found = checkpoints_dir(job, key).glob(f"tokens_*/{artifact}")
    return sorted((int(d.parent.name.removeprefix("tokens_")), d) for d in found)


# ---------------------------------------------------------------------------------------------
# What a Ray Train run trains


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One member of a fit: its identity and MLflow placement; each Fit's members add what
    they train (a layer, a width, a budget, a start)."""

    key: str
    """Stable identity: the MLflow run key, its checkpoint and output folders."""
    name: str
    """Readable run name (MLflow UI)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra MLflow tags (grid axes)."""
    parent_run: str | None = None
    """MLflow parent run id (a sweep)."""
    stop: StopRule | None = None
    """When the member may stop before its budget (checked at each of its checkpoints): it then
    leaves the group, its last checkpoint its final artefact."""
    resume_from: str | None = None
    """A training state folder the member goes on from (one that stopped, whose sweep now asks
    for more): its group's stream starts at that state's step, as it would have gone on."""
    readouts: tuple[RunSpec, ...] = ()
    """Evaluations of the member's final artefact read elsewhere (the zero-shot matrix: a
    scratch SAE read at every layer), each a member-like spec with its own key, run and site;
    evaluated in the same pass as the member's final checkpoint and logged, at step 0, to a
    finished run of its own."""


@dataclass(frozen=True, kw_only=True)
class FitSpec:
    """One Ray Train run: a group of members trained from one data stream."""

    key: str
    """The group's stable identity: the Ray Train run name."""
    members: tuple[RunSpec, ...]


@dataclass(frozen=True)
class FitResult:
    out_dir: Path
    """The final artefact's folder."""
    run_id: str
    """MLflow run id."""
    metrics: dict[str, float]
    """Metrics of the final checkpoint (none when the member failed)."""
    error: str | None = None
    """Why the member stopped short of its budget (it diverged), while the others went on."""


class Fit(ABC):
    """What one Ray Train run trains, built on every worker from the job and the spec."""

    artifact: ClassVar[str]
    """The artefact's folder name in a checkpoint and its MLflow artifact path."""
    output_kind: ClassVar[str]
    """The folder under runs_dir that holds the final artefacts of this kind."""

    def __init__(self, job: JobConfig, spec: FitSpec, rank: int, world: int, device: torch.device):
        self.job, self.spec, self.rank, self.world, self.device = job, spec, rank, world, device

    @classmethod
    @abstractmethod
    def check(cls, job: JobConfig, spec: FitSpec) -> None:
        """On the driver, before any worker starts: raise on settings the data cannot honour."""

    @abstractmethod
    def build(self, member: RunSpec, state: TrainState | None) -> torch.nn.Module:
        """A member's model on this worker's device, identical on every worker (a resumed
        member loads `state` in its trainer)."""

    @abstractmethod
    def trainer(self, member: RunSpec, model: torch.nn.Module, state: TrainState | None,
                **loop: Any) -> Trainer:
        """The member's loop; `loop` carries on_metrics, on_checkpoint, allreduce_grads and
        world_size."""

    @abstractmethod
    def batches(self, skip_batches: int) -> Iterator[Any]:
        """This worker's stream, from batch `skip_batches` on (those before were consumed)."""

    @abstractmethod
    def member_batch(self, member: RunSpec, batch: Any) -> Any:
        """The part of a stream batch a member trains on."""

    @property
    @abstractmethod
    def files(self) -> list[str]:
        """The data this worker reads (disjoint across workers)."""

    @abstractmethod
    def run_tags(self, member: RunSpec) -> dict[str, str]:
        """MLflow tags of a member's run (beside the member's own)."""

    @abstractmethod
    def run_params(self, member: RunSpec) -> dict[str, str]:
        """MLflow params of a member's run."""

    @abstractmethod
    def evaluate(self, due: dict[str, tuple[RunSpec, torch.nn.Module, TrainState]]
                 ) -> dict[str, dict[str, float]]:
        """Rank 0 at the checkpoints of the members due at this step, all at once (so that
        they share the reference forwards): key -> metrics logged at step = tokens seen."""

    @abstractmethod
    def save(self, model: torch.nn.Module, folder: Path) -> Path:
        """Write the artefact (an SAELens folder, a stitch folder)."""


class WorkerHooks:
    """Plug-in points of the worker skeleton for tests (chaos, tracing); production has none."""

    def batches(self, batches: Iterator[Any], fit: Fit, models: dict[str, torch.nn.Module],
                start_step: int) -> Iterator[Any]:
        return batches

    def finished(self, fit: Fit, models: dict[str, torch.nn.Module], start_step: int) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Launch (driver)


def worker_scaling(job: JobConfig) -> ScalingConfig:
    """`train.num_workers` workers, on a GPU each when `train.use_gpu`, else WORKER_CPUS each."""
    tc = job.train
    return ScalingConfig(
        num_workers=tc.num_workers,
        use_gpu=tc.use_gpu,
        resources_per_worker=None if tc.use_gpu else {"CPU": WORKER_CPUS},
    )


def fit_on_ray(
    job: JobConfig,
    spec: FitSpec,
    fit: type[Fit],
    *,
    max_failures: int = 2,
    hooks: WorkerHooks | None = None,
) -> dict[str, FitResult]:
    """Run one Fit on Ray Train; idempotent for a given spec.key (finished members are reused).
    Returns each member's result by key."""
    fit.check(job, spec)
    steps = {m.key: train_state_counters(m.resume_from)[0] for m in spec.members if m.resume_from}
    if steps and (len(set(steps.values())) > 1 or len(steps) < len(spec.members)):
        raise ValueError(f"group {spec.key}: members go on from steps {steps}; a group shares "
                         "one stream, so all its members must go on from one step")
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job": to_dict(job), "spec": spec, "fit": fit, "hooks": hooks,
                           "uri": tracking_uri(job.runs_dir)},
        scaling_config=worker_scaling(job),
        run_config=RunConfig(
            name=run_name_for(spec.key),
            storage_path=str(train_runs_dir(job)),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        group = json.loads((Path(d) / GROUP_FILE).read_text())
    return {
        m.key: FitResult(output_dir(job, fit.output_kind, m.key), group["run_ids"][m.key],
                         group["finished"].get(m.key, {}), group["failed"].get(m.key))
        for m in spec.members
    }


# ---------------------------------------------------------------------------------------------
# The worker skeleton


def allreduce_mean(params: list[torch.Tensor]) -> None:
    """Average gradients across workers with a single all-reduce of one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


NODES_TAG = "raysae.nodes"
"""The Ray node ids a member trained on, in order."""
GROUP_FILE = "group.json"
"""In a group checkpoint: the step, each finished member's final metrics, each failed member's
error, the MLflow run ids."""
MEMBER_FAILED = "diverged"
"""How a phase reports a member that failed on its own while its group went on."""
ERROR_TAG = "raysae.error"
"""On a member's run that failed while its group went on: why."""
STOP_TAG = "raysae.stop"
"""On the run of a member with a stop rule: why it stopped (`target: ...`, `plateau: ...`), or
that it ran its budget without (`budget: ...`)."""
STOP_RULE_TAG = "raysae.stop_rule"
"""On the run of a member with a stop rule (or one that went on after a stop): the rule it was
decided by (`stopping.signature`): a sweep re-submitted with another rule re-decides it."""


@dataclass
class GroupState:
    """Where a group stands: batches consumed, each unfinished member's state at that step,
    the final metrics of the members already done and the errors of those that failed."""

    step: int = 0
    states: dict[str, TrainState] = field(default_factory=dict)
    finished: dict[str, dict[str, float]] = field(default_factory=dict)
    run_ids: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def _resume(members: Sequence[RunSpec]) -> GroupState:
    """The group state of the last committed checkpoint; for a fresh run, the states the
    members go on from (`resume_from`, all at one step), or nothing."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        states = {m.key: load_train_state(m.resume_from) for m in members if m.resume_from}
        return GroupState(next(iter(states.values())).step if states else 0, states)
    with checkpoint.as_directory() as d:
        group = json.loads((Path(d) / GROUP_FILE).read_text())
        states = {k: load_train_state(Path(d) / "states" / run_name_for(k)) for k in group["active"]}
    return GroupState(group["step"], states, group["finished"], group["run_ids"], group["failed"])


class _MemberRun:
    """A member's MLflow run (rank 0): opened or continued by key, metrics at tokens seen."""

    def __init__(self, fit: Fit, member: RunSpec, tracker: Tracker):
        self.fit, self.member, self.tracker = fit, member, tracker
        tags = {**fit.run_tags(member), **member.tags, "raysae.group": fit.spec.key}
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
        folder = checkpoints_dir(fit.job, key) / f"tokens_{state.tokens_seen:012d}" / fit.artifact
        fit.save(model, folder)
        if final:
            fit.save(model, output_dir(fit.job, fit.output_kind, key))
        return values

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
        tags = {"raysae.tokens_seen": str(tokens_seen)}
        if self.member.stop is not None:  # (a member resumed after its group's commit: again)
            tags[STOP_TAG] = (stopped or self.stop_reason()
                              or self.member.stop.not_reached(tokens_seen))
        if self.member.stop is not None or self.member.resume_from:
            tags[STOP_RULE_TAG] = signature(self.member.stop)
        if self.member.stop is None and self.member.resume_from:
            tags[STOP_TAG] = no_rule_reason(tokens_seen)
        self.tracker.set_tags(self.run_id, tags)
        self.tracker.finish(self.run_id)


def _from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every worker (a decision only rank 0, which evaluates, can take)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _log_readout(fit: Fit, tracker: Tracker, readout: RunSpec, evaluation: dict[str, float]
                 ) -> None:
    """A readout's evaluation as a finished run of its own (found again by key: idempotent)."""
    tags = {**fit.run_tags(readout), **readout.tags, "raysae.group": fit.spec.key}
    run_id = tracker.open_run(readout.key, readout.name, tags, {}, readout.parent_run)
    tracker.log_metrics(run_id, evaluation, step=0)
    tracker.finish(run_id)


class _Clock:
    """Seconds spent in each part of the worker loop (stream: reading or forwarding the data;
    train: the SAE steps; eval and commit: checkpoints), and in all since it started."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.parts: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.parts[part] = self.parts.get(part, 0.0) + time.perf_counter() - t

    def seconds(self) -> dict[str, float]:
        return {**self.parts, "worker": time.perf_counter() - self.start}


def _commit(group: GroupState, trainers: dict[str, Trainer], rank: int) -> None:
    """Every worker reports; rank 0 writes the group state (every unfinished member's state at
    this step), then waits until the controller has registered it: a worker that dies before
    that would send the run back to the previous checkpoint, costing a whole interval."""
    if rank != 0:
        ray.train.report({"step": group.step}, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for key, trainer in trainers.items():
            save_train_state(trainer.state(), Path(tmp) / "states" / run_name_for(key))
        record = {"step": group.step, "active": list(trainers), "finished": group.finished,
                  "run_ids": group.run_ids, "failed": group.failed}
        (Path(tmp) / GROUP_FILE).write_text(json.dumps(record))
        ray.train.report({"step": group.step, "finished": len(group.finished)},
                         checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{group.step:012d}")
    ray.train.get_all_reported_checkpoints(CheckpointConsistencyMode.COMMITTED)


def _worker(config: dict[str, Any]) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    job, spec = from_dict(JobConfig, config["job"]), config["spec"]
    fit: Fit = config["fit"](job, spec, rank, world, ray.train.torch.get_device())
    hooks: WorkerHooks = config["hooks"] or WorkerHooks()

    group = _resume(spec.members)
    start = group.step
    active = [m for m in spec.members if m.key not in group.finished and m.key not in group.failed]
    models = {m.key: fit.build(m, group.states.get(m.key)) for m in active}
    runs: dict[str, _MemberRun] = {}
    if rank == 0:
        tracker = Tracker(config["uri"], job.name)
        runs = {m.key: _MemberRun(fit, m, tracker) for m in spec.members}
        group.run_ids = {k: r.run_id for k, r in runs.items()}
        for m in spec.members:  # done before a failure, maybe not yet marked FINISHED
            if m.key in group.finished:
                runs[m.key].finish(int(group.finished[m.key]["tokens_seen"]))
            elif m.key in group.failed:
                runs[m.key].fail(group.failed[m.key])
    due: dict[str, TrainState] = {}
    trainers = {
        m.key: fit.trainer(
            m, models[m.key], group.states.get(m.key),
            on_metrics=runs[m.key].log_train if rank == 0 else None,
            on_checkpoint=lambda st, k=m.key: due.__setitem__(k, st),
            allreduce_grads=allreduce_mean if world > 1 else None,
            world_size=world,
        )
        for m in active
    }
    batches = hooks.batches(fit.batches(start), fit, models, start)
    by_key = {m.key: m for m in active}
    clock = _Clock()
    while trainers:
        with clock("stream"):
            batch = next(batches, None)
        if batch is None:
            raise next(iter(trainers.values())).out_of_data()
        diverged: dict[str, str] = {}
        checks: dict[str, TrainState] = {}  # members whose stop rule is checked between checkpoints
        with clock("train"):
            for key, trainer in trainers.items():
                before = trainer.tokens
                try:
                    trainer.step(fit.member_batch(by_key[key], batch))
                except Diverged as e:  # the same on every worker (the gradient is all-reduced)
                    diverged[key] = f"{by_key[key].name}: {e}"
                    due.pop(key, None)
                    continue
                rule = by_key[key].stop
                if (rule is not None and rule.every_tokens and key not in due
                        and trainer.tokens // rule.every_tokens > before // rule.every_tokens):
                    checks[key] = TrainState(trainer.step_no, trainer.tokens, {}, {}, {})
        group.step += 1
        for key, error in diverged.items():  # it leaves the group, the others go on
            log.error("%s", error)
            group.failed[key] = error
            del trainers[key]
            if rank == 0:
                runs[key].fail(error)
        if not due and not diverged and not checks:
            continue
        done = {k: t.tokens for k, t in trainers.items() if t.done}
        why: dict[str, str] = {}  # members whose stop rule holds here: why
        with clock("eval"):
            if rank == 0 and (due or checks):
                at = {**checks, **due}
                reads = {r.key: (r, models[k], st) for k, st in due.items() if k in done
                         for r in by_key[k].readouts if tracker.finished_metrics(r.key) is None}
                evals = fit.evaluate({**{k: (by_key[k], models[k], st) for k, st in at.items()},
                                      **reads})
                for key, state in at.items():
                    values = runs[key].checkpoint(models[key], state, evals[key], final=key in done)
                    reason = runs[key].stop_reason()
                    if reason is not None:
                        why[key] = reason
                        if key not in done:  # stops here: this checkpoint is its final artefact,
                            fit.save(models[key], output_dir(job, fit.output_kind, key))
                            # and its state is kept: a higher target trains it on from here
                            save_train_state(trainers[key].state(),
                                             stop_state_dir(job, key, state.tokens_seen))
                    if key in done or reason is not None:
                        group.finished[key] = values
                for key, (readout, _, _) in reads.items():
                    _log_readout(fit, tracker, readout, evals[key])
            if world > 1 and any(by_key[k].stop is not None for k in {**due, **checks}):
                why = _from_rank0(why)  # every worker drops the stopped members at this step
        done |= {k: trainers[k].tokens for k in why}
        for key in done:
            del trainers[key]
        if due or diverged or why:  # a check alone commits nothing (it is replayed on resume)
            with clock("commit"):
                _commit(group, trainers, rank)
        due.clear()
        if rank == 0:
            for key, tokens in done.items():
                runs[key].finish(tokens, clock.seconds(), why.get(key))
    hooks.finished(fit, models, start)


# ---------------------------------------------------------------------------------------------
# Phases


@dataclass(frozen=True)
class Phase:
    """One step of a sweep: its trials (each with `.key` and `.depends_on`) and how to run the
    ones whose dependencies finished: `run(todo) -> (done, errors)`."""

    name: str
    trials: Sequence[Any]
    run: Callable[[list[Any]], tuple[Done, Errors]]


def run_phases(phases: Sequence[Phase], tracker: Tracker, parent: str) -> tuple[Done, Errors]:
    """Run the phases in order; a trial whose dependency did not finish is skipped with that
    reason, the others run. Each phase's tally is a `raysae.status.<phase>` tag on the parent."""
    finished: Done = {}
    failed: Errors = {}
    for phase in phases:
        todo = []
        for t in phase.trials:
            missing = [d for d in t.depends_on if d not in finished]
            if missing:
                failed[t.key] = f"skipped: depends on {missing[0]}, which did not finish"
            else:
                todo.append(t)
        done, errors = phase.run(todo) if todo else ({}, {})
        finished.update(done)
        failed.update(errors)
        status = f"{len(done)} done, {len(phase.trials) - len(done)} not done"
        tracker.set_tags(parent, {f"raysae.status.{phase.name}": status})
        log.info("phase %s: %s", phase.name, status)
    return finished, failed


def log_plan(tracker: Tracker, parent: str, job: JobConfig, why: str,
             phases: Sequence[PhasePlan]) -> None:
    """Print a sweep's plan and keep it on its parent run (`plan.json`, source tags)."""
    log.info("plan:\n%s", plan_report(job, why, phases))
    tracker.log_dict(parent, {"source": job.train.source, "why": why,
                              "phases": [dataclasses.asdict(p) for p in phases]}, "plan.json")
    tracker.set_tags(parent, {"raysae.source": job.train.source, "raysae.source_why": why[:250]})


@dataclass(frozen=True)
class SweepResult:
    parent_run: str
    """MLflow run id of the sweep."""
    finished: Done
    """Trial key -> final metrics, for every trial that completed."""
    failed: Errors
    """Trial key -> why it did not complete (its error, or the failed trial it needed)."""
    summary: dict[str, Any]
    """The sweep's summary (counts, and what each study adds)."""


def _tune_trial(config: dict[str, Any], run_group: Callable[..., dict[str, FitResult]],
                payload: dict) -> None:
    """A Tune function trainable: one trial drives one Fit (a group) and reports the final
    metrics of each of its members."""
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
        tune.with_parameters(_tune_trial, run_group=run_group, payload=payload), {"CPU": TRIAL_CPUS}
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
    alone: Callable[[Any], dict[str, Any]],
) -> tuple[Done, Errors]:
    """Run a phase's groups (`tune_phase`, `run_group(key, groups=specs, **extra)`); a group
    that fails is then split and its members retried one per group, so that a fault in one
    member's data fails that member only, not the SAEs that shared its stream. (A member that
    diverged has already left its group, which went on without it: it is not retried.)"""
    groups = {k: members_of(spec) for k, spec in specs.items()}
    done, errors = tune_phase(job, experiment, groups, run_group, {"groups": specs, **extra},
                              max_failures)
    group_failed = {k for k, e in errors.items() if not e.startswith(MEMBER_FAILED)}
    retry = {k: single for key, spec in specs.items()
             if len(groups[key]) > 1 and any(m in group_failed for m in groups[key])
             for k, single in alone(spec).items()}
    if retry:
        log.info("%s: %d group(s) failed; retrying their %d members one by one", experiment,
                 sum(1 for k in specs if len(groups[k]) > 1 and set(groups[k]) & group_failed),
                 len(retry))
        more, still = tune_phase(job, f"{experiment}-alone",
                                 {k: members_of(spec) for k, spec in retry.items()}, run_group,
                                 {"groups": retry, **extra}, max_failures)
        done |= more
        errors = {k: v for k, v in errors.items() if k not in more} | still
    return done, errors


def concurrent_fits(job: JobConfig) -> int:
    """Fits at once: as many Train worker groups as the cluster's CPUs (or GPUs) hold, each
    with its driving trial; at most SQLITE_CONCURRENT_TRIALS against a sqlite MLflow store."""
    res = ray.cluster_resources()
    workers = job.train.num_workers
    if job.train.use_gpu:
        n = int(res.get("GPU", 0) // workers)
    else:
        n = int(res.get("CPU", 1) // (WORKER_CPUS * workers + TRIAL_CPUS))
    if tracking_uri(job.runs_dir).startswith("sqlite:"):
        n = min(n, SQLITE_CONCURRENT_TRIALS)
    return max(1, n)


def fan_out(
    task: Any,
    groups: dict[str, list[str]],
    *args: Any,
    max_retries: int,
    error_prefix: str = "failed",
    **options: Any,
) -> tuple[Done, Errors]:
    """One Ray task per group of trial keys, run concurrently: `task.remote(keys, *args)`
    returns {key: metrics}. A group's failure marks each of its keys with the root cause and
    does not stop the other groups."""
    refs = {label: task.options(max_retries=max_retries, **options).remote(keys, *args)
            for label, keys in groups.items()}
    done: Done = {}
    errors: Errors = {}
    for label, ref in refs.items():
        try:
            done.update(ray.get(ref))
        except Exception as e:
            for key in groups[label]:
                errors[key] = f"{error_prefix}: {root_cause(e)}"
    return done, errors
