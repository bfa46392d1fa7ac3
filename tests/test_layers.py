"""The layers hold: the import-linter contract of pyproject.toml (what `make lint` runs) keeps on
the tree and breaks on planted wrong imports, each naming the contract it breaks; and, what a
static contract cannot see, no third-party import of the core loads ray or mlflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

PLANTED = {
    # module -> (the wrong import, the line lint-imports reports, the contract it breaks)
    "raysae/metrics.py": ("import raysae.distributed",
                          "raysae.metrics is not allowed to import raysae.distributed",
                          "raysae's layers point down BROKEN"),
    "raysae/train.py": ("import raysae.tracking",  # the core would load mlflow through it
                        "raysae.train is not allowed to import raysae.tracking",
                        "raysae's layers point down BROKEN"),
    "raysae/transfer/scores.py": ("from raysae.stitching import stitch",
                                  "raysae.transfer is not allowed to import raysae.stitching",
                                  "raysae's layers point down BROKEN"),
    "raysae/stopping.py": ("import ray", "raysae.stopping -> ray",
                           "only raysae.distributed imports ray BROKEN"),
    "raysae/models.py": ("import mlflow", "raysae.models -> mlflow",
                         "only raysae.tracking and analysis import mlflow BROKEN"),
    "analysis/common.py": ("import raysae.evaluate", "analysis.common -> raysae.evaluate",
                           "analysis imports no training code BROKEN"),
}


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports on the tree at `root`, with the contract of its pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}  # that tree's raysae, not the installed one
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_contract() -> None:
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 broken." in out.stdout


def test_planted_wrong_imports_break_the_contracts_they_cross(tmp_path: Path) -> None:
    for part in ("raysae", "analysis", "jobs"):
        shutil.copytree(ROOT / part, tmp_path / part,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    assert lint_imports(tmp_path).returncode == 0  # the copy keeps them before the plants
    for module, (line, _, _) in PLANTED.items():
        with open(tmp_path / module, "a") as f:
            f.write(f"\n{line}  # planted\n")
    (tmp_path / "raysae" / "unplaced.py").write_text('"""A module no layer lists."""\n')
    out = lint_imports(tmp_path)
    assert out.returncode != 0
    for module, (_, reported, contract) in PLANTED.items():
        assert reported in out.stdout, (module, out.stdout)
        assert contract in out.stdout, (module, out.stdout)
    assert "raysae.unplaced" in out.stdout and "exhaustive" in out.stdout
    assert "raysae imports neither jobs nor analysis KEPT" in out.stdout  # nothing planted there


def test_the_core_loads_neither_ray_nor_mlflow_at_run_time() -> None:
    """Every module but the edges the contract allows them (raysae.distributed, raysae.tracking,
    raysae.cli) imports in a plain Python process without ray or mlflow in sys.modules: this
    also sees what third-party packages the core imports load, which the contract does not
    (it graphs raysae's own imports). Found from the files, so a new module is checked too (not
    with pkgutil.walk_packages, which imports every package it descends into, the edges too)."""
    code = (
        "import importlib, pathlib, sys, raysae; "
        "root = pathlib.Path(raysae.__file__).parent; "
        "edges = ('raysae.distributed', 'raysae.tracking', 'raysae.cli'); "
        "names = ['.'.join(('raysae',) + p.relative_to(root).with_suffix('').parts) "
        "         for p in sorted(root.rglob('*.py'))]; "
        "mods = [n.removesuffix('.__init__') for n in names "
        "        if not n.startswith(edges)]; "
        "[importlib.import_module(m) for m in mods]; "
        "assert len(mods) > 25, mods; "
        "bad = [m for m in ('ray', 'mlflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_train_worker_loads_neither_tune_nor_mlflow_on_import() -> None:
    """What a Ray Train worker imports (the group loop and the SAE fit it unpickles) leaves Ray
    Tune and mlflow unloaded: the engine's re-exports load on first use and mlflow loads when a
    Tracker is made (the worker's imports went from 5.6 to 4.3 s of CPU)."""
    code = (
        "import sys, raysae.distributed.engine.group, raysae.distributed.training; "
        "bad = [m for m in ('ray.tune', 'mlflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
