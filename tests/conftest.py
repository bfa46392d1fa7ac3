"""Shared fixtures: tiny models built from a config, a local token file, one Ray instance."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raysae.config import CacheConfig, DataConfig, JobConfig, ModelConfig, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "jobs"))
from local_head import kill_session, local_head  # noqa: E402  (jobs/ is not a package)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# no spot nodes here: one actor process less per Ray Train run (its start-up is ~1.3 s of CPU)
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# a local Ray a raysae command starts leaves its dashboard out (~5 s of CPU per start)
os.environ.setdefault("RAYSAE_LOCAL_DASHBOARD", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test reaches a hub: fail at once, not after retries

TINY_NEOX = dict(
    model_type="gpt_neox",
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=256,
    vocab_size=128,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The modules that start Ray first, in their order: under pytest-xdist (`make test` runs
    two workers, `--dist loadfile`: a module's tests, and so its module fixtures, on one worker)
    the long ones are then not left for the end."""
    heavy = {i.module.__name__ for i in items if i.get_closest_marker("ray") is not None}
    items.sort(key=lambda i: i.module.__name__ not in heavy)  # stable: each module's order kept


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads (and a shared machine makes them slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local parquet of token-id rows; every row starts with BOS (id 0) like a real corpus."""
    rng = np.random.default_rng(0)
    rows = rng.integers(3, TINY_NEOX["vocab_size"], size=(64, 32)).astype(np.int32)
    rows[:, 0] = 0
    path = tmp_path_factory.mktemp("tokens") / "tokens.parquet"
    pq.write_table(pa.table({"input_ids": pa.array(list(rows))}), path)
    return path


def build_cfg(tmp: Path, token_file: Path, **overrides: object) -> JobConfig:
    """A small valid job; keyword overrides replace whole sections (model=, data=, cache=)."""
    parts: dict[str, object] = dict(
        name="test",
        model=ModelConfig(name="tiny-neox", from_config=TINY_NEOX),
        data=DataConfig(source=str(token_file), context_length=16, num_tokens=512),
        cache=CacheConfig(layers=(0, 2), sites=("resid_post",), shard_tokens=128, out_dir=str(tmp / "acts")),
        train=TrainConfig(eval_tokens=256),  # held out after the 512 cached, within the file's 2,048
        runs_dir=str(tmp),
    )
    parts.update(overrides)
    return JobConfig(**parts)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _tracking_uri_restored():
    """Each test leaves MLflow's tracking URI as it found it: `mlflow.set_tracking_uri` (the
    checks' way to read runs) exports MLFLOW_TRACKING_URI, which would send a later test's
    driver, and the local Ray it starts, to this test's store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)  # its global, and the variable it exported
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if before is not None:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance per test module (a few seconds to start). Not session-wide: the
    job-submission test runs its own `ray start --head` and `ray stop` stops every instance."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200_000_000,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def toy_pair(tmp_path_factory: pytest.TempPathFactory):
    """The toy language and model pair of the "test" preset, built once per session.

    Set RAYSAE_TOY_ROOT to a directory to keep the build between sessions (it is then reused).
    Under xdist the workers share one build: the first builds it, the others wait on a lock.
    """
    from filelock import FileLock

    from raysae.toy import ensure_toy_pair, preset

    # one build for all xdist workers: the base temp's parent is theirs in common
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    root = Path(os.environ.get("RAYSAE_TOY_ROOT") or shared / "toy")
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        return ensure_toy_pair(preset("test"), root=root)


def driver_env(**extra: str) -> dict[str, str]:
    """The environment of a sweep driver subprocess: its own local Ray, and no
    MLFLOW_TRACKING_URI (mlflow.set_tracking_uri, used by the checks, exports it, which would
    send the sweep to another test's store)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "RAY_ADDRESS": "local", **extra}  # the settings above come with os.environ


def kill_when(cmd: list[str], env: dict[str, str], ready: Callable[[], bool], settle_s: float,
              timeout_s: float) -> tuple[bool, int | None]:
    """Start a driver in its own session and SIGKILL all of it (the driver and the local Ray it
    started, nothing else) `settle_s` after `ready()` first holds. Watch the file system in
    `ready`, not MLflow: a second sqlite client racing the driver's creation of the database
    could break it. Returns (killed, the exit code if it ended by itself)."""
    first = subprocess.Popen(cmd, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
        if ready():
            time.sleep(settle_s)
            os.killpg(first.pid, signal.SIGKILL)
            kill_session(first.pid)  # Ray's workers: process groups of their own, same session
            first.wait(timeout=60)
            return True, None
    first.wait(timeout=60)
    return False, first.returncode


# ---------------------------------------------------------------------------------------------
# A real browser (the dashboard pages, MLflow's UI)


def browser() -> str:
    """The headless browser's path; missing, the test fails in CI and is skipped elsewhere."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    msg = ("no headless browser found (chromium, chromium-browser, google-chrome): install one, "
           "e.g. `apt-get install -y chromium`")
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def headless(url: str, *args: str) -> subprocess.CompletedProcess:
    """Run the headless browser on one URL (args: --dump-dom, --screenshot=..., ...)."""
    cmd = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-dev-shm-usage", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=True)


@pytest.fixture(scope="session")
def foreign_ray() -> Iterator[str]:
    """A Ray head the suite did not start for itself (a user's own cluster, as far as the tests
    are concerned): the tests that start, kill and stop Ray instances must leave it running.
    Yields its job API URL; `ray_alive(url)` checks it."""
    with local_head(None, "--num-cpus", "0", "--object-store-memory", "80000000",
                    env={**os.environ, "RAY_AUTH_MODE": "token"}) as head:
        yield head.dashboard


def ray_alive(dashboard: str) -> bool:
    """Whether the head's job API answers (with token auth, 401 to us: still alive)."""
    from local_head import answers

    return answers(f"{dashboard}/api/version")


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An empty sqlite MLflow store, created once (its schema migrations take seconds): the
    analysis tests copy it (`mlflow_store`) before fabricating their runs."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def mlflow_store(template: Path, root: Path):
    """A client of a fresh copy of the empty store at `root / mlflow.db`."""
    from mlflow.tracking import MlflowClient

    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, root / "mlflow.db")
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def perturb(sae):
    """Move every tensor of an SAE off its initial value so tests see non-trivial biases and
    norms."""
    import torch

    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.5)
        sae.W_dec.mul_(torch.rand(sae.d_sae, 1, dtype=sae.W_dec.dtype) + 0.5)
    return sae
