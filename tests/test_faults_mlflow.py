"""The MLflow server unreachable for a while: a real `mlflow server` (sqlite store) is killed
while a training logs through the Tracker and started again ~10 s later on the same port and
database; and a proxy in front of it loses the answers to requests the store has already
applied, so that both MLflow's own retries and the Tracker's send them again. Every Tracker call
completes, and each key has one run, each metric step one row, each run the right status."""

from __future__ import annotations

import http.client
import http.server
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from raysae.config import SAEConfig, TrainConfig
from raysae.sae import SAE
from raysae.tracking import RUN_KEY_TAG, Tracker, TrackingUnavailable
from raysae.train import train_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on a fixed port over one sqlite file, which can be killed and restarted."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
               str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        with (self.root / "server.log").open("a") as out:  # a session of its own: uvicorn too
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.root / "server.log").read_text()[-3000:]
                pytest.fail(f"mlflow server did not answer (exit {self.proc.poll()}):\n{log}")
            time.sleep(0.2)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server and its uvicorn worker (its whole session), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("mlflow-server"))
    s.start()
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture
def mlflow_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[str | None], None]:
    """Sets MLflow's own per-request retries for the test (None: MLflow's default, 7)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def retries(n: str | None) -> None:
        if n is None:
            monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
        else:
            monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", n)

    return retries


def runs_by_key(url: str, experiment: str) -> dict[str, list[tuple[str, str]]]:
    """key -> [(status, lifecycle stage)] of every run of the experiment, deleted ones too."""
    client = MlflowClient(url)
    exp = client.get_experiment_by_name(experiment)
    out: dict[str, list[tuple[str, str]]] = {}
    for run in client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL):
        out.setdefault(run.data.tags[RUN_KEY_TAG], []).append(
            (run.info.status, run.info.lifecycle_stage))
    return out


def steps(url: str, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(url).get_metric_history(run_id, metric))


# ---------------------------------------------------------------------------------------------
# The server killed and restarted


def short_training(on_metrics: Callable[[int, dict[str, float]], None]) -> None:
    """A real SAE training (32 log points) on random data, logging through `on_metrics`."""
    cfg = TrainConfig(num_tokens=40_960, batch_size=256, lr=1e-3, checkpoint_every_tokens=40_960,
                      dead_window_tokens=10_240, log_every_steps=5)
    sae = SAE(SAEConfig(architecture="relu", d_sae=32, k=4), 16, seed=1)
    gen = torch.Generator().manual_seed(0)
    batches = (torch.randn(256, 16, generator=gen) for _ in range(10_000))
    train_sae(sae, cfg, batches, on_metrics=on_metrics)


def test_a_training_outlives_a_server_restart(server: Server, mlflow_env, caplog) -> None:
    mlflow_env("0")  # no retries inside MLflow: the Tracker alone carries the outage
    caplog.set_level(logging.WARNING, logger="raysae.tracking")
    exp = "outage"
    logged: list[int] = []
    at_fifth, killed = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def train() -> None:
        tracker = Tracker(server.url, exp, wait_s=90)
        parent = tracker.open_run("sweep", "sweep")
        run = tracker.open_run("sae", "sae", params={"lr": "0.001"}, parent=parent)

        def on_metrics(tokens: int, values: dict[str, float]) -> None:
            tracker.log_metrics(run, values, step=tokens)
            logged.append(tokens)
            if len(logged) == 5:  # mid-training: the next log meets a dead server
                at_fifth.set()
                killed.wait(30)

        short_training(on_metrics)
        tracker.finish(run)
        assert tracker.open_run("sae", "sae") == run  # found again by its key, not a second run
        tracker.finish(run)
        tracker.finish(parent)

    def others() -> None:  # starts while the server is down: opening the experiment waits too
        tracker = Tracker(server.url, exp, wait_s=90)
        for i in range(3):
            run = tracker.open_run(f"other-{i}", f"other {i}", params={"i": str(i)})
            for step in range(3):
                tracker.log_metrics(run, {"x": float(step)}, step=step)
            tracker.finish(run, "FAILED" if i == 2 else "FINISHED")

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001  (re-raised in the test's thread)
                errors.append(e)
        return run

    trainer = threading.Thread(target=guarded(train))
    trainer.start()
    assert at_fifth.wait(60), errors
    server.kill()
    down = time.monotonic()
    killed.set()
    other = threading.Thread(target=guarded(others))
    other.start()
    time.sleep(4)
    server.start()  # same port, same database; ~6 s to answer again
    outage = time.monotonic() - down
    trainer.join(120)
    other.join(120)
    assert not trainer.is_alive() and not other.is_alive()
    if errors:
        raise errors[0]

    assert outage > 8
    waits = [r.getMessage() for r in caplog.records if "is unreachable" in r.getMessage()]
    assert len(waits) >= 2  # both threads met the dead server
    runs = runs_by_key(server.url, exp)
    assert runs == {"sweep": [("FINISHED", "active")], "sae": [("FINISHED", "active")],
                    "other-0": [("FINISHED", "active")], "other-1": [("FINISHED", "active")],
                    "other-2": [("FAILED", "active")]}
    tracker = Tracker(server.url, exp)
    sae_run = tracker.find("sae")
    assert sae_run is not None and len(logged) == 32
    for metric in ("mse", "l0", "lr"):
        assert steps(server.url, sae_run, metric) == logged  # every step, each once
    assert MlflowClient(server.url).get_run(sae_run).data.params == {"lr": "0.001"}
    for i in range(3):
        assert steps(server.url, tracker.find(f"other-{i}"), "x") == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# Answers lost after the store applied the request


class LosingProxy(http.server.ThreadingHTTPServer):
    """Forwards HTTP to the server, but for the n-th requests to a path (n in `lose[path]`,
    counted from 1) it drops the connection after the server has answered, as a network cut or
    a crash would."""

    def __init__(self, upstream_port: int, lose: dict[str, set[int]]) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream_port, self.lose, self.lost = upstream_port, lose, 0
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LosingProxy

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        answer = upstream.getresponse()
        data = answer.read()
        upstream.close()
        path = self.path.split("?")[0]
        with self.server.lock:
            n = self.server.seen[path] = self.server.seen.get(path, 0) + 1
            lose = n in self.server.lose.get(path, set())
            self.server.lost += lose
        if lose:
            self.close_connection = True  # no answer: the client sees the connection drop
            return
        self.send_response(answer.status)
        for k, v in answer.getheaders():
            if k.lower() not in ("content-length", "connection", "transfer-encoding", "date",
                                 "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _forward


API = "/api/2.0/mlflow"


@pytest.mark.parametrize("mlflow_retries", ["0", None], ids=["tracker-resends", "mlflow-resends"])
def test_requests_sent_twice_leave_one_run_and_one_row_per_step(
    server: Server, mlflow_env, mlflow_retries: str | None
) -> None:
    mlflow_env(mlflow_retries)
    # the create; the params, then the first metrics (each request after a lost one is its resend);
    # the first status update
    lose = {f"{API}/runs/create": {1}, f"{API}/runs/log-batch": {1, 3}, f"{API}/runs/update": {1}}
    proxy = LosingProxy(server.port, lose)
    exp = f"lost answers {mlflow_retries}"
    try:
        tracker = Tracker(proxy.url, exp, wait_s=30)
        run = tracker.open_run("k", "k", tags={"raysae.layer": "1"}, params={"lr": "0.01"})
        for step in (0, 100, 200):
            tracker.log_metrics(run, {"fvu": 0.5 - step / 1000, "l0": 8.0}, step=step)
        tracker.finish(run)
        assert tracker.open_run("k", "k") == run
        tracker.finish(run)
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert proxy.lost == 4  # every answer meant to be lost was lost
    runs = runs_by_key(server.url, exp)["k"]
    # MLflow resending the create makes a second run, which the Tracker deletes
    assert runs.count(("FINISHED", "active")) == 1
    assert len(runs) == (1 if mlflow_retries == "0" else 2)
    for metric in ("fvu", "l0"):
        assert steps(server.url, run, metric) == [0, 100, 200]
    assert MlflowClient(server.url).get_run(run).data.params == {"lr": "0.01"}


# ---------------------------------------------------------------------------------------------
# What is not retried, and the limit


def test_an_answer_of_the_server_is_not_retried(server: Server, mlflow_env) -> None:
    mlflow_env("0")
    tracker = Tracker(server.url, "answers", wait_s=60)
    start = time.monotonic()
    with pytest.raises(MlflowException, match="not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
        tracker.status("0" * 32)
    assert time.monotonic() - start < 5


def test_a_server_that_stays_away_is_named_with_the_wait(mlflow_env) -> None:
    mlflow_env("0")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=rf"MLflow at {url} did not answer for 2 s while "
                                                  r"trying to open experiment 'x' "
                                                  r"\(RAYSAE_MLFLOW_WAIT_S=2 s"):
        Tracker(url, "x", wait_s=2)
    assert 2 <= time.monotonic() - start < 10
