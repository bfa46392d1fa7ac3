# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
RUNS ?= $(CURDIR)/runs
DEMO_CONFIG ?= jobs/configs/toy_sweep.yaml jobs/configs/toy_stitch.yaml
DASHBOARD := http://127.0.0.1:8265
export RAY_USAGE_STATS_ENABLED := 0
export PATH := $(BIN):$(PATH)

.PHONY: demo test lint bench clean-runs

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The pinned CPU wheel first: an unpinned torch would pull several GB of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .

# A local Ray head on 127.0.0.1, the demo sweep through `ray job submit`, then the head stops.
demo: $(VENV)/.installed
	# The toy pair is built here, with every core, before the job reuses it (first run only).
	$(BIN)/python -m raysae.toy --root $(RUNS)/toy
	$(BIN)/ray stop --force >/dev/null 2>&1 || true
	$(BIN)/ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 \
		--dashboard-port 8265 --disable-usage-stats
	RAY_AUTH_MODE=token $(BIN)/ray job submit --address $(DASHBOARD) --working-dir . \
		-- python jobs/demo.py $(DEMO_CONFIG) --runs-dir $(RUNS); \
		status=$$?; $(BIN)/ray stop >/dev/null; exit $$status

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_caching.py

clean-runs:
	rm -rf runs
