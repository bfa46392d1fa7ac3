"""`ray job submit -- python jobs/sweep.py CONFIG [--runs-dir DIR]`: the layer-transfer sweep of
a config's `sweep` section; re-submitting an interrupted sweep finishes only what is missing."""

import sys

from raysae.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
