"""`ray job submit -- python jobs/stitch.py CONFIG [--runs-dir DIR]`: the model-stitching sweep
of a config's `stitch` section; re-submitting an interrupted sweep finishes only what is missing."""

import sys

from raysae.cli import main

if __name__ == "__main__":
    sys.exit(main(["stitch", *sys.argv[1:]]))
