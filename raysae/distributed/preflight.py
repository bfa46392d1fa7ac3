"""Preflight: before the first token, one task pinned to every alive node checks what a run would
otherwise find out late, on that node, with that node's own disk and environment.

The driver writes a marker into the runs dir; each node's task reads it and writes one back
(the store is shared both ways), finds CUDA and the GPU's memory against
`train.worker_memory_gb` when `use_gpu`, reaches the tracking server it logs to (the job's, fixed by
the driver: a node's own MLFLOW_TRACKING_URI is never read), sees the local model and data paths the job names and
can write to its scratch dir (the hub's download cache). A failure names the node, the check,
what was found and the fix, within seconds (`PreflightError`, exit 2 from the CLI).

A node that joins later (the autoscaler's) is checked before its first group: each Tune trial
runs `check_node` where it lands, once per node (the store read through the marker the driver
keeps, `.preflight/driver`); a node that fails stops its trial with a `PreflightError` naming it,
a misconfiguration (`faults`), not a member's fault.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysae.config import ConfigError, JobConfig, local_path
from raysae.tracking import job_tracking_uri

KEPT = "driver"
"""The driver's marker under `<runs_dir>/.preflight/`, kept for the nodes that join later; the
nodes that passed are listed beside it (`nodes/<node id>`)."""
PROBE_TIMEOUT_S = 120.0
"""How long the driver waits for a node's answer: a node that answers names its own problems
in seconds; this bounds only a node that cannot start the task at all (a worker process on a
loaded node can take tens of seconds to start)."""


@dataclass(frozen=True)
class Problem:
    node: str
    check: str
    found: str
    fix: str

    def __str__(self) -> str:
        return f"node {self.node}: {self.check}: {self.found}; {self.fix}"


class PreflightError(ConfigError):
    """Some node cannot run the job as configured (the message lists every problem)."""


def _local_paths(job: JobConfig) -> dict[str, str]:
    """The job's settings that name a local path, each node must see it."""
    s = job.stitch
    named = {"model.name": job.model.name, "data.source": job.data.source,
             "data.tokenizer": job.data.tokenizer, "stitch.large.name": s and s.large.name,
             "stitch.variants": s and s.variants,
             "stitch.probes.source": s and s.probes and s.probes.source}
    return {k: v for k, v in named.items() if v and local_path(v) is not None}


def probe(job: JobConfig, marker: str, token: str | None, reply: str, uri: str
          ) -> list[tuple[str, str, str]]:
    """On one node: every check, as (check, found, fix) for those that fail (`token`: what the
    marker must hold; None: any driver's)."""
    out: list[tuple[str, str, str]] = []
    runs = job.runs_dir
    try:
        seen = Path(marker).read_text()
        if token is not None and seen != token:
            raise OSError(f"it holds {seen!r}, not this run's marker")
        Path(reply).parent.mkdir(parents=True, exist_ok=True)
        Path(reply).write_text(seen)
    except OSError as e:
        out.append(("store", f"the driver's marker {marker} cannot be read and answered here ({e})",
                    f"make runs_dir {runs!r} a store every node reaches (a shared mount at the "
                    "same path on every node)"))
    if job.train.use_gpu:
        import torch

        if not torch.cuda.is_available():
            out.append(("gpu", "train.use_gpu is set but CUDA is not available here",
                        "install the NVIDIA driver and the CUDA build of torch on this node, or "
                        "keep GPU work off it"))
        else:
            gb = torch.cuda.get_device_properties(0).total_memory / 2**30
            if gb < job.train.worker_memory_gb:
                out.append(("gpu", f"{torch.cuda.get_device_name(0)} has {gb:.1f} GiB, "
                            f"train.worker_memory_gb is {job.train.worker_memory_gb:g}",
                            "lower train.worker_memory_gb to the GPU's memory or use a larger GPU"))
    if uri.startswith(("http://", "https://")):  # the driver's: every task logs there
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as r:
                r.read()
        except OSError as e:
            out.append(("tracking", f"the tracking server {uri} does not answer ({e})",
                        "start `mlflow server` on the head, reachable from every node"))
    for name, path in _local_paths(job).items():
        if not Path(path).expanduser().exists():
            out.append(("paths", f"{name} {path!r} is not on this node",
                        "put it on the shared store or on every node at the same path"))
    scratch = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    try:
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=scratch):
            pass
    except OSError as e:
        out.append(("scratch", f"the download cache {scratch} is not writable ({e})",
                    "set HF_HOME to a writable node-local dir"))
    return out


def preflight(job: JobConfig, timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
    """Run `probe` on every alive node; raise PreflightError naming every problem found (a node
    that does not answer in `timeout_s` is one). Returns the nodes checked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    folder = Path(job.runs_dir) / ".preflight" / token
    marker = folder / "driver"
    try:
        folder.mkdir(parents=True)
        marker.write_text(token)
        kept = Path(job.runs_dir) / ".preflight" / KEPT
        (kept.parent / "nodes").mkdir(exist_ok=True)
        kept.with_name(f".{KEPT}.tmp").write_text(token)
        kept.with_name(f".{KEPT}.tmp").replace(kept)
    except OSError as e:
        raise PreflightError(f"preflight failed before any work: the driver cannot write its "
                             f"marker {marker} ({e}); make runs_dir {job.runs_dir!r} writable") from None
    uri = job_tracking_uri(job)
    task = ray.remote(num_cpus=0, max_retries=0)(probe)
    nodes = {n["NodeID"]: f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})"
             for n in ray.nodes() if n["Alive"]}
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote(job, str(marker), token, str(folder / node), uri): node for node in nodes}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    problems = [Problem(nodes[refs[r]], "answer", f"no answer in {timeout_s:g} s",
                        "check that the node is up and has the project installed") for r in late]
    for r in ready:
        node = nodes[refs[r]]
        try:
            found: list[Any] = ray.get(r)
        except Exception as e:  # the task itself could not run there
            found = [("task", f"the preflight task failed ({str(e).splitlines()[-1]})",
                      "check the node's environment (the project and its packages installed)")]
        problems += [Problem(node, *f) for f in found]
        if not found and not (folder / refs[r]).exists():
            problems.append(Problem(node, "store", "its answer is not in the driver's store",
                                    f"make runs_dir {job.runs_dir!r} the same store on every node"))
    shutil.rmtree(folder, ignore_errors=True)
    failed = {p.node for p in problems}  # a node that did not answer is one
    for node, name in nodes.items():
        if name not in failed:
            _kept(job, node).touch()
    for r in late:
        ray.cancel(r, force=True)
    if problems:
        raise PreflightError("preflight failed before any work:\n" + "\n".join(f"  {p}" for p in problems))
    return sorted(nodes.values())


def _kept(job: JobConfig, node: str) -> Path:
    """Where a node that passed the preflight is recorded."""
    return Path(job.runs_dir) / ".preflight" / "nodes" / node


def preflight_ran(job: JobConfig) -> bool:
    """Whether a driver ran the preflight on this runs dir (its kept marker is there)."""
    return (Path(job.runs_dir) / ".preflight" / KEPT).is_file()


def check_node(job: JobConfig) -> None:
    """The preflight of the node this runs on, before its first work, when it has none yet (it
    joined after the job's): every check `probe` makes, the store read through the driver's kept
    marker. Raises PreflightError naming the node, on one line."""
    import ray

    ctx = ray.get_runtime_context()
    node = ctx.get_node_id()
    ok = _kept(job, node)
    if ok.exists():
        return
    found = probe(job, str(Path(job.runs_dir) / ".preflight" / KEPT), None,
                  str(ok.with_name(f"{node}.answer")), job_tracking_uri(job))
    if not found:
        ok.touch()
    else:
        where = ray.util.get_node_ip_address()
        raise PreflightError(f"node {where} ({node[:8]}) joined after the preflight and fails it: "
                             + "; ".join(f"{check}: {what}; {fix}" for check, what, fix in found))
