"""Entrypoint for `ray job submit -- python jobs/cache.py CONFIG`: cache a config's activations."""

import sys

from raysae.cli import main

if __name__ == "__main__":
    sys.exit(main(["cache", *sys.argv[1:]]))
