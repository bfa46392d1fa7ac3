"""A Ray head of our own on this machine: started on free ports with its own temp dir, in its
own process session, and stopped by ending that session only. `ray stop` would stop every Ray
instance on the host, a user's own cluster included; nothing here touches what it did not start.

    python jobs/local_head.py [--dashboard-port 8265] -- COMMAND ...

runs COMMAND with RAY_ADDRESS (the GCS) and RAY_DASHBOARD_ADDRESS (the job API, for
`ray job submit --address $RAY_DASHBOARD_ADDRESS`) of the new head, then stops the head, and
exits with COMMAND's status. The dashboard binds to 127.0.0.1; when the asked-for dashboard port
is taken (another Ray's), a free one is used and printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
STOP_GRACE_S = 3.0
"""How long the head's processes get to exit on SIGTERM before SIGKILL. Its dashboard and
workers exit within a second; gcs_server, the raylet and the agents were still running 8 s
after SIGTERM (measured here), so a longer wait only delays the kill. The jobs have ended and
written what they write by then."""


def free_port(preferred: int | None = None) -> int:
    """`preferred` when nothing listens there, else a port the kernel picks."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port")


def kill_session(sid: int, sig: int = signal.SIGKILL) -> int:
    """Signal every process of session `sid` (a process started with start_new_session and all
    it started: Ray's workers have process groups of their own but stay in the session).
    Returns how many were signalled."""
    n = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state, ppid, pgrp, session
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(stat.parent.name), sig)
                n += 1
    return n


def answers(url: str) -> bool:
    """Whether an HTTP server answers at `url` (any status: with Ray's token auth the job API
    says 401 to a request without the token)."""
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Head:
    address: str
    """The GCS address (RAY_ADDRESS)."""
    dashboard: str
    """The job API's URL (`ray job submit --address`)."""

    def env(self) -> dict[str, str]:
        return {**os.environ, "RAY_ADDRESS": self.address, "RAY_DASHBOARD_ADDRESS": self.dashboard}


@contextlib.contextmanager
def local_head(dashboard_port: int | None = None, *ray_args: str,
               env: dict[str, str] | None = None, timeout_s: float = 120) -> Iterator[Head]:
    """Start a head (`ray start --head` in a new session: it returns once the node is up, its
    daemons stay in the session), yield it, then end its session."""
    port, dash = free_port(), free_port(dashboard_port)
    if dashboard_port and dash != dashboard_port:
        print(f"local_head: port {dashboard_port} is taken (another Ray?); dashboard on {dash}",
              file=sys.stderr)
    temp = tempfile.mkdtemp(prefix="raysae-ray-")  # short: Ray's socket paths live under it
    # every port Ray would otherwise take at a fixed default (and share with another head)
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
           "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--dashboard-agent-listen-port", str(free_port()),
           "--ray-client-server-port", str(free_port()), "--min-worker-port", "0",
           "--max-worker-port", "0", "--temp-dir", temp, "--disable-usage-stats", *ray_args]
    run_env = {**(env or os.environ), "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, env=run_env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed (exit {proc.returncode}):\n{err}")
        head = Head(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}")
        if not answers(f"{head.dashboard}/api/version"):
            raise RuntimeError(f"the Ray head started but its job API at {head.dashboard} does "
                               f"not answer:\n{err}")
        yield head
    finally:
        kill_session(proc.pid, signal.SIGTERM)  # the session outlives `ray start` itself
        deadline = time.time() + STOP_GRACE_S
        while kill_session(proc.pid, 0) and time.time() < deadline:
            time.sleep(0.2)
        kill_session(proc.pid)  # whatever did not stop by itself
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given (after --)")
    with local_head(args.dashboard_port) as head:
        print(f"local_head: Ray head at {head.address}, jobs at {head.dashboard}", file=sys.stderr)
        command = [c.replace("{dashboard}", head.dashboard) for c in command]
        return subprocess.run(command, env=head.env()).returncode


if __name__ == "__main__":
    sys.exit(main())
