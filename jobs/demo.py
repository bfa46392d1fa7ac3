"""The demo job (`make demo` submits it): for each config, its layer-transfer sweep, its stitch
sweep, or (with neither section) its train job, then the analysis of the experiment from MLflow.

    ray job submit --working-dir . -- python jobs/demo.py CONFIG [CONFIG ...] --runs-dir DIR
"""

import subprocess
import sys
from pathlib import Path

from raysae.cli import main
from raysae.config import load_config

ANALYSIS = Path(__file__).resolve().parent.parent / "analysis"

if __name__ == "__main__":
    args = sys.argv[1:]
    runs = args[args.index("--runs-dir") : args.index("--runs-dir") + 2] if "--runs-dir" in args else []
    configs = [a for a in args if a not in runs]
    status = 0
    for path in configs:
        cfg = load_config(path)
        steps = [("sweep", "sweep_report.py")] if cfg.sweep else []
        steps += [("stitch", "stitch_report.py")] if cfg.stitch else []
        for command, script in steps or [("train", "layer_table.py")]:
            status = main([command, path, *runs]) or status
            if status == 0:
                runs_dir = runs[1] if runs else "runs"
                uri = ["--tracking-uri", cfg.tracking_uri] if cfg.tracking_uri else []
                status = subprocess.call(
                    [sys.executable, str(ANALYSIS / script), cfg.name, "--runs-dir", runs_dir, *uri]
                )
    sys.exit(status)
