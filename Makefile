# Everything a fresh machine needs: `make demo` and `make test` create .venv,
# install torch first, then medrl, then run.
#
# GPU users: pick the torch build for your CUDA, e.g.
#   make demo TORCH_SPEC='torch==2.6.0' TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cu124'
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= test,fid
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: install browser demo demo-weights test test-fast lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install '$(TORCH_SPEC)' $(TORCH_PIP_ARGS)
	$(BIN)/pip install -e '.[$(EXTRAS)]'
	@if $(BIN)/python -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('torchvision') else 1)"; then \
		echo "torchvision got installed (it breaks transformers/diffusers on CPU torch): remove what pulled it in"; exit 1; fi
	touch $@

install: $(VENV)/.installed

# The demo's models are tiny: on the 2-core CPU machine one torch thread per process
# fine-tunes the UNet 2.2x faster than two (1.75 vs 0.8 steps/s; the VAE's larger
# convolutions go 2.0 vs 3.1 steps/s, a smaller share of the time), and Ray's actors
# already keep both cores busy (the fine-tune's progress bars of `make demo` and of
# `make demo DEMO_THREADS=2` on fresh data). GPU users: make demo DEMO_THREADS=8 (or more).
DEMO_THREADS ?= 1

demo: install
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/medrl demo --config configs/demo.yaml

# The demo's base generator (generators/assets/demo-base), made from the phantom by its recipe:
# about 24 minutes on one CPU core. The weights are in the repository; this remakes them.
demo-weights: install
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/python -m medrl.demo_weights --config configs/demo.yaml

# The rating workbench's browser tests (tests/rewards/test_workbench_browser.py) drive
# Debian's chromium through Playwright. Installed here when we can (root with apt-get);
# otherwise those tests say so and skip (CI sets MEDRL_REQUIRE_BROWSER=1: they fail).
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null || \
		(apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null); \
	else echo "no $(CHROMIUM): the workbench's browser tests will skip (Debian: sudo apt-get install chromium)"; fi

test: install browser lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python benchmarks/sampling.py
	$(BIN)/python benchmarks/reward_service.py
	$(BIN)/python benchmarks/rl_iteration.py
	$(BIN)/python benchmarks/workbench_load.py
	$(BIN)/python benchmarks/anchors.py $(if $(TRL_RESULTS),--trl-results $(TRL_RESULTS))

clean:
	rm -rf $(VENV) runs .pytest_cache
