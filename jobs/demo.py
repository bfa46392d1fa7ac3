"""The demo job (`make demo` submits it): the train job on a config, then the per-layer table.

    ray job submit --working-dir . -- python jobs/demo.py jobs/configs/toy.yaml --runs-dir DIR
"""

import subprocess
import sys
from pathlib import Path

from raysae.cli import main
from raysae.config import load_config

if __name__ == "__main__":
    args = sys.argv[1:]
    status = main(["train", *args])
    if status == 0:
        runs_dir = args[args.index("--runs-dir") + 1] if "--runs-dir" in args else "runs"
        table = Path(__file__).resolve().parent.parent / "analysis" / "layer_table.py"
        name = load_config(args[0]).name
        status = subprocess.call([sys.executable, str(table), name, "--runs-dir", runs_dir])
    sys.exit(status)
