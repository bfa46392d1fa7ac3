"""`ray job submit -- python jobs/train.py CONFIG [--runs-dir DIR]`: cache a config's activations,
train one SAE per cached site on Ray Train, evaluate each in the LM, log everything to MLflow."""

import sys

from raysae.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
