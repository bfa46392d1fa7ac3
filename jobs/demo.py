"""The demo job (`make demo` submits it): a config's sweep (or, without a `sweep` section, its
train job), then the analysis of the experiment from MLflow.

    ray job submit --working-dir . -- python jobs/demo.py jobs/configs/toy_sweep.yaml --runs-dir DIR
"""

import subprocess
import sys
from pathlib import Path

from raysae.cli import main
from raysae.config import load_config

if __name__ == "__main__":
    args = sys.argv[1:]
    cfg = load_config(args[0])
    status = main(["sweep" if cfg.sweep else "train", *args])
    if status == 0:
        runs_dir = args[args.index("--runs-dir") + 1] if "--runs-dir" in args else "runs"
        script = "sweep_report.py" if cfg.sweep else "layer_table.py"
        analysis = Path(__file__).resolve().parent.parent / "analysis" / script
        status = subprocess.call([sys.executable, str(analysis), cfg.name, "--runs-dir", runs_dir])
    sys.exit(status)
