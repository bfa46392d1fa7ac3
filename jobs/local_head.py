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
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


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
    """Start a head (`ray start --head --block` in a new session), yield it once its job API
    answers, then end its session."""
    port, dash = free_port(), free_port(dashboard_port)
    if dashboard_port and dash != dashboard_port:
        print(f"local_head: port {dashboard_port} is taken (another Ray?); dashboard on {dash}",
              file=sys.stderr)
    temp = tempfile.mkdtemp(prefix="raysae-ray-")  # short: Ray's socket paths live under it
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--temp-dir", temp, "--disable-usage-stats", *ray_args]
    run_env = {**(env or os.environ), "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, env=run_env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    head = Head(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}")
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start failed (exit {proc.returncode}):\n{proc.stderr.read()}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=2)
                break
            if time.time() > deadline:
                raise TimeoutError(f"the Ray head's job API at {head.dashboard} did not answer "
                                   f"within {timeout_s:.0f} s")
            time.sleep(0.5)
        yield head
    finally:
        kill_session(proc.pid, signal.SIGTERM)  # `ray start --block` stops what it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        kill_session(proc.pid)  # and whatever did not stop by itself


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
