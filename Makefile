# Two commands set everything up: `make demo` and `make test`. Each creates .venv when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=

.PHONY: demo seeds test test-fast bench lint clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)  ## the main job end to end on the built-in procedural car set
	$(BIN)/python -m clipdiff.pipeline $(ARGS)

seeds: $(STAMP)  ## the demo for training seeds 0, 1, 2 (same data), then mean ± std over them → outputs/aggregate/…/spread.md
	$(BIN)/python -m clipdiff.pipeline -m seed=0,1,2 $(ARGS)
	$(BIN)/python -m clipdiff.aggregate sweep_dir=$$(ls -d outputs/pipeline/multiruns/* | tail -n 1) spread_over=seed

test: $(STAMP)  ## the whole test suite (CPU, ~10 minutes on 2 cores: 252 tests in 616 s on a fresh clone, 2026-12-01)
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: $(STAMP)  ## skip the tests marked slow
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

bench: $(STAMP)  ## speed claims as side-by-side ratios → outputs/bench/latest.csv and README's Benchmarks block (~6 min)
	$(BIN)/python -m clipdiff.bench --readme $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check clipdiff tests

clean-venv:
	rm -rf $(VENV)
