# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
RUNS ?= $(CURDIR)/runs
DEMO_CONFIG ?= jobs/configs/toy_sweep.yaml jobs/configs/toy_stitch.yaml
export RAY_USAGE_STATS_ENABLED := 0
export PATH := $(BIN):$(PATH)

.PHONY: demo test lint bench clean-runs

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned, first: on this project's CPU machines the local mirror gives its CPU wheel (an
	# unpinned torch would pull several GB of CUDA wheels); from PyPI on Linux it is the CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Two pytest-xdist workers, each module's tests on one of them (tests/conftest.py: the modules
# that start Ray first); one worker alone leaves this 2-core machine idle a quarter of the time.
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

# ruff, then the import-linter contract of pyproject.toml (the README's layers).
lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# A Ray head of its own on 127.0.0.1 (free ports, own temp dir; dashboard on 8265 when free),
# the demo sweep through `ray job submit`, then that head stops; any other Ray on the machine
# is left alone (no `ray stop`).
demo: $(VENV)/.installed
	# The toy pair is built here, with every core, before the job reuses it (first run only).
	$(BIN)/python -m raysae.toy --root $(RUNS)/toy
	RAY_AUTH_MODE=token $(BIN)/python jobs/local_head.py --dashboard-port 8265 -- \
		$(BIN)/ray job submit --address {dashboard} --working-dir . \
		-- python jobs/demo.py $(DEMO_CONFIG) --runs-dir $(RUNS)

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_caching.py

clean-runs:
	rm -rf runs
