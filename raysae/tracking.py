"""The MLflow adapter: one run per training, found again by a stable key so that a resumed
training continues its own run instead of opening a second one.

The tracking URI is `MLFLOW_TRACKING_URI` when set (a server, for clusters), else a sqlite
file under the job's runs directory. Experiments created here keep their artifacts under the
runs directory too (not in `./mlruns` of whatever directory a Ray worker happens to run in).
Every call goes through an explicit run id (MlflowClient), never the process-global active run,
so Ray workers and restarts cannot mix runs up. This class is the whole MLflow edge of the
training code: nothing else holds a client or an MLflow type (a run is read back as a plain
`RunRecord`; the analysis scripts read MLflow on their own).

A tracking server that stops answering for a while (a restart, a network cut) does not end a
training. MLflow's client first retries each HTTP request itself (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`,
default 7, with exponential backoff: about four minutes); when it gives up, the Tracker calls
again with a backoff of its own until `RAYSAE_MLFLOW_WAIT_S` (default 300) have passed since the
call began, then raises `TrackingUnavailable` naming the URI and the wait. Only a connection
failure is retried, never an answer of the server. A repeated call must not duplicate anything:
- metrics: a batch keeps its timestamps across attempts, and MLflow's SQL store keys metric rows
  on (key, timestamp, step, value), so a batch that reached the store before the connection
  dropped is not stored twice (tested against a real server);
- runs: a run is created only when a search by its key finds none, and a duplicate made anyway
  (MLflow's own retry of a create whose answer was lost) is deleted right after, keeping the
  oldest, which `find` also returns;
- params, tags, status and artifacts are set, not appended: sending them twice is harmless.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import requests

if TYPE_CHECKING:
    from mlflow.entities import Run

    from raysae.config import JobConfig

log = logging.getLogger("raysae.tracking")
T = TypeVar("T")

RUN_KEY_TAG = "raysae.run_key"
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""The experiment's kind: training runs, not GenAI traces. MLflow 3.17's UI does not read it to
pick its landing page (it takes `?workflowType=` or the side bar's switch, default GenAI), so
raysae prints links with `?workflowType=machine_learning` (`ui_hint`); tested in a browser."""
_MAX_BATCH = 100  # MLflow's log_batch limit on params per call
_MAX_METRICS = 1000  # and on metrics
SUPERSEDED_TAG = "raysae.superseded_by"
"""On a deleted run: the run of the same key that replaced it (`Tracker.supersede`)."""
WAIT_ENV = "RAYSAE_MLFLOW_WAIT_S"
DEFAULT_WAIT_S = 300.0
_MAX_BACKOFF_S = 5.0  # between attempts once MLflow gave up: a light poll of a server coming back


@dataclass(frozen=True)
class RunRecord:
    """One run as it was read: its identity, state, tags, params and latest metrics, as plain
    values (what callers above this edge read of a run, without importing mlflow)."""

    run_id: str
    name: str
    status: str
    """RUNNING, FINISHED, FAILED, ..."""
    lifecycle_stage: str
    """`active`, or `deleted` (a superseded run, kept by MLflow and restorable)."""
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    """The latest value of each metric."""

    @classmethod
    def of(cls, run: Run) -> RunRecord:
        info, data = run.info, run.data
        return cls(info.run_id, info.run_name or "", info.status, info.lifecycle_stage,
                   dict(data.tags), dict(data.params), dict(data.metrics))


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer within the Tracker's wait."""


def wait_seconds() -> float:
    """How long a Tracker call keeps retrying an unreachable server: RAYSAE_MLFLOW_WAIT_S, else
    300 s."""
    text = os.environ.get(WAIT_ENV)
    if text is None:
        return DEFAULT_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise ValueError(f"{WAIT_ENV}={text!r}: expected a number of seconds >= 0")
    return value


def unreachable(error: BaseException) -> bool:
    """Whether an MLflow call failed because the server could not be reached (refused, reset,
    timed out, or still answering 429/5xx after MLflow's own retries), as opposed to an answer
    of the server (a bad request, a missing run). MLflow wraps the `requests` error in an
    MlflowException, so the causes are searched."""
    seen: set[int] = set()
    err: BaseException | None = error
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, requests.exceptions.SSLError):
            return False  # a certificate problem does not heal by waiting
        if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                            requests.exceptions.RetryError,
                            requests.exceptions.ChunkedEncodingError)):
            return True
        err = err.__cause__ or err.__context__
    return False


def ui_hint(runs_dir: str | Path) -> str:
    """How to browse the runs: the `mlflow ui` command and the link that opens on the runs table."""
    return (f"MLflow: mlflow ui --backend-store-uri {tracking_uri(runs_dir)}  (runs table: "
            f"'Model training' in the side bar, or #/experiments/<id>?workflowType=machine_learning)")


def job_tracking_uri(job: JobConfig) -> str:
    """A job's tracking URI: its `tracking_uri` (fixed by the driver), else `tracking_uri`."""
    return job.tracking_uri or tracking_uri(job.runs_dir)


def tracking_uri(runs_dir: str | Path) -> str:
    """MLFLOW_TRACKING_URI, else sqlite:///<runs_dir>/mlflow.db (absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


class Tracker:
    """One MLflow experiment, seen through explicit run ids."""

    @classmethod
    def for_job(cls, job: JobConfig) -> Tracker:
        """The job's tracker, the same for its driver, workers and tasks: its experiment, its
        URI (`job_tracking_uri`), artifacts of a new experiment under `<runs_dir>/mlartifacts`."""
        return cls(job_tracking_uri(job), job.name, Path(job.runs_dir) / "mlartifacts")

    def __init__(self, uri: str, experiment: str, artifact_root: str | Path | None = None,
                 wait_s: float | None = None) -> None:
        """`artifact_root`: where a new experiment keeps artifacts (sqlite backends only).
        `wait_s`: how long each call retries an unreachable server (default `wait_seconds()`)."""
        self.uri = uri
        self.wait_s = wait_seconds() if wait_s is None else wait_s
        # mlflow loads here, not at import: a process that only asks for the URI (a Tune trial,
        # a Train worker) does not spend its 1.3 s of CPU on it
        from mlflow.tracking import MlflowClient

        if uri.startswith("sqlite:///"):  # its folder, made by the first process to log
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(uri)
        artifacts = None
        if uri.startswith("sqlite:") and artifact_root is not None:
            artifacts = Path(artifact_root).resolve().as_uri()
        self.experiment_id = self._retry(f"open experiment {experiment!r}",
                                         lambda: self._experiment(experiment, artifacts))

    def _experiment(self, name: str, artifacts: str | None) -> str:
        """The experiment's id, creating it (with its kind) when missing."""
        found = self._client.get_experiment_by_name(name)
        if found is None:
            try:
                return self._client.create_experiment(name, artifacts, tags=EXPERIMENT_KIND)
            except Exception as e:  # created concurrently by another worker or trial
                found = self._client.get_experiment_by_name(name)
                if unreachable(e) or found is None:
                    raise
        for k, v in EXPERIMENT_KIND.items():  # one made before raysae set the kind
            if found.tags.get(k) != v:
                self._client.set_experiment_tag(found.experiment_id, k, v)
        return found.experiment_id

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        """`call()`, called again with backoff while the server is unreachable, for at most
        `wait_s` seconds from the first attempt; then TrackingUnavailable names the URI."""
        start = time.monotonic()
        pause = 0.5
        failures = 0
        while True:
            try:
                result = call()
            except Exception as e:
                if not unreachable(e):
                    raise
                waited = time.monotonic() - start
                if waited >= self.wait_s:
                    raise TrackingUnavailable(
                        f"MLflow at {self.uri} did not answer for {waited:.0f} s while trying to "
                        f"{what} ({WAIT_ENV}={self.wait_s:g} s; each attempt also retries on its "
                        f"own, see MLFLOW_HTTP_REQUEST_MAX_RETRIES); last error: {e}"
                    ) from e
                if failures == 0:
                    log.warning("MLflow at %s is unreachable (%s); retrying for up to %.0f s",
                                self.uri, what, self.wait_s)
                failures += 1
                time.sleep(min(pause, self.wait_s - waited))
                pause = min(2 * pause, _MAX_BACKOFF_S)
                continue
            if failures:
                log.warning("MLflow at %s answered again after %.0f s (%s)", self.uri,
                            time.monotonic() - start, what)
            return result

    def _runs_with_key(self, key: str, view: str = "ACTIVE_ONLY") -> list[Run]:
        """The live runs carrying the key (`view` "ALL": the deleted ones too), oldest first
        (start time, then id: the same order in every process)."""
        from mlflow.entities import ViewType

        runs = self._client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=50,
            run_view_type=getattr(ViewType, view),
        )
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def find(self, key: str) -> str | None:
        """The run id carrying this stable key (the oldest, should there be several), if any."""
        runs = self._retry(f"find the run of {key!r}", lambda: self._runs_with_key(key))
        return runs[0].info.run_id if runs else None

    def open_run(
        self,
        key: str,
        name: str,
        tags: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        parent: str | None = None,
    ) -> str:
        """Resume the run with this key (setting it RUNNING again), or create it."""
        run_id = self.find(key)
        if run_id is not None:
            self._retry(f"resume run {run_id}",
                        lambda: self._client.update_run(run_id, status="RUNNING"))
            return run_id
        all_tags = {RUN_KEY_TAG: key, **(tags or {})}
        if parent is not None:
            all_tags[PARENT_TAG] = parent
        run_id = self._retry(f"create the run of {key!r}",
                             lambda: self._create_once(key, name, all_tags))
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        for s in range(0, len(items), _MAX_BATCH):
            chunk = items[s : s + _MAX_BATCH]
            self._retry(f"log the params of run {run_id}",
                        lambda chunk=chunk: self._client.log_batch(run_id, params=chunk))
        return run_id

    def _create_once(self, key: str, name: str, tags: dict[str, str]) -> str:
        """Create the run unless one with the key exists (an earlier attempt may have reached
        the store), then keep only the oldest run with the key: MLflow's client resends a
        create whose answer was lost, which makes a second run."""
        runs = self._runs_with_key(key)
        if not runs:
            self._client.create_run(self.experiment_id, tags=tags, run_name=name)
            runs = self._runs_with_key(key)
        for extra in runs[1:]:
            log.warning("deleting run %s: a duplicate of run %s (key %r)", extra.info.run_id,
                        runs[0].info.run_id, key)
            self._client.delete_run(extra.info.run_id)
        return runs[0].info.run_id

    def every_run(self, key: str) -> list[RunRecord]:
        """Every run that carried the key, the deleted (superseded) ones included, oldest first."""
        runs = self._retry(f"find the runs of {key!r}", lambda: self._runs_with_key(key, "ALL"))
        return [RunRecord.of(r) for r in runs]

    def copy_run(self, run_id: str, up_to: int, parent: str | None,
                 drop_tags: tuple[str, ...] = ()) -> str:
        """A new RUNNING run with the tags (but `drop_tags`), params and metric history of
        `run_id` at steps <= `up_to` (timestamps kept): the run a training that ended at
        `up_to` would have logged. It carries the same key, so the caller then supersedes the
        old run."""
        run = self.run(run_id)
        tags = {k: v for k, v in run.tags.items()
                if k not in drop_tags and (not k.startswith("mlflow.") or k == PARENT_TAG)}
        if parent is not None:
            tags[PARENT_TAG] = parent
        new = self._retry(f"copy run {run_id}", lambda: self._client.create_run(
            self.experiment_id, tags=tags, run_name=run.name).info.run_id)
        from mlflow.entities import Metric, Param

        params = [Param(k, v) for k, v in run.params.items()]
        metrics = [Metric(m.key, m.value, m.timestamp, m.step) for key in run.metrics
                   for m in self._retry(f"read the history of {key!r} in run {run_id}",
                                        lambda key=key: self._client.get_metric_history(run_id, key))
                   if m.step <= up_to]
        for items, size, kind in ((params, _MAX_BATCH, "params"), (metrics, _MAX_METRICS, "metrics")):
            for s in range(0, len(items), size):
                chunk = items[s : s + size]
                self._retry(f"copy the {kind} of run {run_id}",
                            lambda chunk=chunk, kind=kind: self._client.log_batch(new, **{kind: chunk}))
        return new

    def supersede(self, run_id: str, by: str) -> None:
        """Delete `run_id` (MLflow keeps it, restorable), tagged with the run that replaced it."""
        self.set_tags(run_id, {SUPERSEDED_TAG: by})
        self._retry(f"delete run {run_id}", lambda: self._client.delete_run(run_id))

    def status(self, run_id: str) -> str:
        """RUNNING, FINISHED, FAILED, ..."""
        return self.run(run_id).status

    def metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of every metric of the run."""
        return self.run(run_id).metrics

    def tags(self, run_id: str) -> dict[str, str]:
        return self.run(run_id).tags

    def run(self, run_id: str) -> RunRecord:
        """The run: its status, lifecycle stage, tags, params and latest metrics."""
        return RunRecord.of(self._retry(f"read run {run_id}", lambda: self._client.get_run(run_id)))

    def history(self, run_id: str, metric: str) -> list[tuple[int, float]]:
        """(step, value) of every logged value of one metric, in logging order."""
        found = self._retry(f"read the history of {metric!r} in run {run_id}",
                            lambda: self._client.get_metric_history(run_id, metric))
        return [(m.step, m.value) for m in found]

    def finished_metrics(self, key: str) -> dict[str, float] | None:
        """The metrics of the FINISHED run with this key; None when there is none."""
        run_id = self.find(key)
        if run_id is None or self.status(run_id) != "FINISHED":
            return None
        return self.metrics(run_id)

    def log_metrics(self, run_id: str, values: Mapping[str, float], step: int) -> None:
        """Metrics at one step (raysae uses tokens seen as the step). The timestamp is taken
        once, so a batch sent again after a lost answer is the same rows, which the store keeps
        once."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in values.items()]
        self._retry(f"log metrics at step {step} of run {run_id}",
                    lambda: self._client.log_batch(run_id, metrics=batch))

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self._retry(f"set tags of run {run_id}", lambda: self._client.log_batch(run_id, tags=batch))

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str) -> None:
        self._retry(f"upload {local_dir} to run {run_id}",
                    lambda: self._client.log_artifacts(run_id, str(local_dir), artifact_path))

    def log_dict(self, run_id: str, data: Mapping, artifact_file: str) -> None:
        self._retry(f"upload {artifact_file} to run {run_id}",
                    lambda: self._client.log_dict(run_id, dict(data), artifact_file))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self._retry(f"mark run {run_id} {status}",
                    lambda: self._client.set_terminated(run_id, status))
