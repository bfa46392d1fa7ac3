"""The preflight: one task on every node before any work, failing in seconds with the node, the
check, what it found and the fix. A node that does not share the store is a worker raylet in a
mount namespace of its own (a private tmpfs over the runs dir), as on a real cluster."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_NEOX, build_cfg, driver_env
from local_head import kill_session, local_head

from raysae.config import TrainConfig
from raysae.distributed import root_cause
from raysae.distributed.engine.faults import fault_kind
from raysae.distributed.preflight import PreflightError, check_node, preflight, preflight_ran

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent


def test_a_good_node_passes_and_a_missing_gpu_or_server_is_named(ray_local, tmp_path, token_file,
                                                                  monkeypatch):
    cfg = build_cfg(tmp_path / "runs", token_file)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t0 = time.time()
    [node] = preflight(cfg)
    assert node.startswith(ray_local.nodes()[0]["NodeManagerAddress"])
    # its markers removed but the one kept for nodes that join later; this node listed as passed
    kept = tmp_path / "runs" / ".preflight"
    assert sorted(p.name for p in kept.iterdir()) == ["driver", "nodes"]
    assert [p.name for p in (kept / "nodes").iterdir()] == [ray_local.nodes()[0]["NodeID"]]
    # a CPU node with use_gpu: named, with the fix
    gpu = dataclasses.replace(cfg, train=TrainConfig(use_gpu=True, eval_tokens=256))
    with pytest.raises(PreflightError) as e:
        preflight(gpu)
    assert f"node {node}: gpu: train.use_gpu is set but CUDA is not available here" in str(e.value)
    # a tracking server that does not answer (this node has no MLFLOW_TRACKING_URI of its own)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(PreflightError) as e:
        preflight(cfg)
    assert f"node {node}: tracking: the tracking server http://127.0.0.1:{port} does not answer" in str(e.value)
    assert time.time() - t0 < 30


def test_a_node_that_joins_later_is_checked_where_its_first_trial_lands(ray_local, tmp_path,
                                                                         token_file, monkeypatch):
    """`check_node`, which each trial runs first after a preflight: a node listed as passed is
    not checked again; one not listed is, with every check, and named on one line, a
    misconfiguration (the sweep stops), not a member's fault."""
    cfg = build_cfg(tmp_path / "runs", token_file)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert not preflight_ran(cfg)
    preflight(cfg)
    assert preflight_ran(cfg)
    check = ray_local.remote(num_cpus=0)(check_node)
    nodes = tmp_path / "runs" / ".preflight" / "nodes"
    (nodes / ray_local.nodes()[0]["NodeID"]).unlink()  # as a node that joined after it
    gpu = dataclasses.replace(cfg, train=TrainConfig(use_gpu=True, eval_tokens=256))
    with pytest.raises(Exception) as e:
        ray_local.get(check.remote(gpu))
    cause = root_cause(e.value)
    assert "joined after the preflight and fails it: gpu: train.use_gpu is set but CUDA is not " \
           "available here" in cause and fault_kind(cause) == "config"
    listed = lambda: [p.name for p in nodes.iterdir() if p.suffix != ".answer"]  # noqa: E731
    assert listed() == []  # a failed node is not listed
    ray_local.get(check.remote(cfg))  # it passes: listed, and not checked again
    assert listed() == [ray_local.nodes()[0]["NodeID"]]
    ray_local.get(check.remote(gpu))
    # a node whose runs dir is not the driver's store (its own disk: no kept marker there)
    elsewhere = dataclasses.replace(cfg, runs_dir=str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(Exception) as e:
        ray_local.get(check.remote(elsewhere))
    assert f"store: the driver's marker {tmp_path / 'elsewhere'}/.preflight/driver cannot be read" \
           in root_cause(e.value)


def test_a_node_that_does_not_share_the_store_is_named_before_any_work(tmp_path, token_file):
    if shutil.which("unshare") is None:
        pytest.fail("no `unshare` (util-linux): the share-nothing node needs a mount namespace")
    runs = tmp_path / "runs"
    runs.mkdir()
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "preflight", "model": {"name": "tiny", "from_config": TINY_NEOX},
        "data": {"source": str(token_file), "context_length": 16, "num_tokens": 512},
        "cache": {"layers": [0], "shard_tokens": 128},
        "train": {"num_tokens": 512, "batch_size": 64, "eval_tokens": 256}}))
    with local_head(None, "--num-cpus", "1", "--object-store-memory", "80000000",
                    timeout_s=300) as head:
        # the worker node sees its own empty runs dir, not the head's
        start = (f"mount -t tmpfs tmpfs {runs} && exec {BIN / 'ray'} start --address={head.address} "
                 "--node-ip-address 127.0.0.1 --num-cpus 1 --object-store-memory 80000000 "
                 "--disable-usage-stats --block")
        worker = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", start],
                                  start_new_session=True, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            probe = [sys.executable, "-c", "import ray; ray.init(); print(len([n for n in ray.nodes() if n['Alive']]))"]
            deadline = time.time() + 90
            while time.time() < deadline:
                out = subprocess.run(probe, env=driver_env(RAY_ADDRESS=head.address),
                                     capture_output=True, text=True, timeout=60).stdout.strip()
                if out == "2":
                    break
                time.sleep(1)
            assert out == "2", "the worker node did not join"
            t0 = time.time()
            cmd = [sys.executable, "-m", "raysae.cli", "cache", str(cfg), "--runs-dir", str(runs)]
            done = subprocess.run(cmd, env=driver_env(RAY_ADDRESS=head.address),
                                  capture_output=True, text=True, timeout=120)
            took = time.time() - t0
        finally:
            kill_session(worker.pid)
            worker.wait(timeout=30)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert took < 30, took
    assert "preflight failed before any work" in done.stderr and "Traceback" not in done.stderr
    store = [ln for ln in done.stderr.splitlines() if ": store: " in ln]
    assert len(store) == 1, done.stderr  # the worker node; the head shares the driver's disk
    assert f"the driver's marker {runs}/.preflight/" in store[0]
    assert f"make runs_dir {str(runs)!r} a store every node reaches" in store[0]
    assert not (runs / "activations").exists()  # no work started
