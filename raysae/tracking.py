"""The MLflow adapter: one run per training, found again by a stable key so that a resumed
training continues its own run instead of opening a second one.

The tracking URI is `MLFLOW_TRACKING_URI` when set (a server, for clusters), else a sqlite
file under the job's runs directory. Experiments created here keep their artifacts under the
runs directory too (not in `./mlruns` of whatever directory a Ray worker happens to run in).
Every call goes through an explicit run id (MlflowClient), never the process-global active run,
so Ray workers and restarts cannot mix runs up. This class is the whole MLflow edge of the
training code: nothing else holds a client (the analysis scripts read MLflow on their own).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

RUN_KEY_TAG = "raysae.run_key"
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""The experiment's kind: training runs, not GenAI traces. MLflow 3.17's UI does not read it to
pick its landing page (it takes `?workflowType=` or the side bar's switch, default GenAI), so
raysae prints links with `?workflowType=machine_learning` (`ui_hint`); tested in a browser."""
_MAX_BATCH = 100  # MLflow's log_batch limit on params per call


def ui_hint(runs_dir: str | Path) -> str:
    """How to browse the runs: the `mlflow ui` command and the link that opens on the runs table."""
    return (f"MLflow: mlflow ui --backend-store-uri {tracking_uri(runs_dir)}  (runs table: "
            f"'Model training' in the side bar, or #/experiments/<id>?workflowType=machine_learning)")


def tracking_uri(runs_dir: str | Path) -> str:
    """MLFLOW_TRACKING_URI, else sqlite:///<runs_dir>/mlflow.db (absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    path = Path(runs_dir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


class Tracker:
    """One MLflow experiment, seen through explicit run ids."""

    @classmethod
    def for_runs_dir(cls, runs_dir: str | Path, experiment: str) -> Tracker:
        """The job's tracker: its URI, artifacts under `<runs_dir>/mlartifacts`."""
        return cls(tracking_uri(runs_dir), experiment, Path(runs_dir) / "mlartifacts")

    def __init__(self, uri: str, experiment: str, artifact_root: str | Path | None = None) -> None:
        """`artifact_root`: where a new experiment keeps artifacts (sqlite backends only)."""
        self.uri = uri
        self._client = MlflowClient(uri)
        found = self._client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
            for k, v in EXPERIMENT_KIND.items():  # one made before raysae set the kind
                if found.tags.get(k) != v:
                    self._client.set_experiment_tag(self.experiment_id, k, v)
        else:
            artifacts = None
            if uri.startswith("sqlite:") and artifact_root is not None:
                artifacts = Path(artifact_root).resolve().as_uri()
            try:
                self.experiment_id = self._client.create_experiment(experiment, artifacts,
                                                                    tags=EXPERIMENT_KIND)
            except Exception:  # created concurrently by another worker or trial
                self.experiment_id = self._client.get_experiment_by_name(experiment).experiment_id

    def find(self, key: str) -> str | None:
        """The run id carrying this stable key, if any."""
        runs = self._client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=2
        )
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
            self._client.update_run(run_id, status="RUNNING")
            return run_id
        all_tags = {RUN_KEY_TAG: key, **(tags or {})}
        if parent is not None:
            all_tags[PARENT_TAG] = parent
        run = self._client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        run_id = run.info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        for s in range(0, len(items), _MAX_BATCH):
            self._client.log_batch(run_id, params=items[s : s + _MAX_BATCH])
        return run_id

    def status(self, run_id: str) -> str:
        """RUNNING, FINISHED, FAILED, ..."""
        return self._client.get_run(run_id).info.status

    def metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of every metric of the run."""
        return dict(self._client.get_run(run_id).data.metrics)

    def tags(self, run_id: str) -> dict[str, str]:
        return dict(self._client.get_run(run_id).data.tags)

    def history(self, run_id: str, metric: str) -> list[tuple[int, float]]:
        """(step, value) of every logged value of one metric, in logging order."""
        return [(m.step, m.value) for m in self._client.get_metric_history(run_id, metric)]

    def finished_metrics(self, key: str) -> dict[str, float] | None:
        """The metrics of the FINISHED run with this key; None when there is none."""
        run_id = self.find(key)
        if run_id is None or self.status(run_id) != "FINISHED":
            return None
        return self.metrics(run_id)

    def log_metrics(self, run_id: str, values: Mapping[str, float], step: int) -> None:
        """Metrics at one step (raysae uses tokens seen as the step)."""
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in values.items()]
        self._client.log_batch(run_id, metrics=batch)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self._client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str) -> None:
        self._client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_dict(self, run_id: str, data: Mapping, artifact_file: str) -> None:
        self._client.log_dict(run_id, dict(data), artifact_file)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self._client.set_terminated(run_id, status)
