# Two commands set everything up: `make demo` and `make test`. Each creates .venv when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=
# the tests run in one pytest-xdist worker per CPU (most of their time is commands run as subprocesses, which leave
# a one-process run's second core idle); tests that share an expensive fixture carry @pytest.mark.xdist_group and stay
# on one worker (loadgroup). ARGS="-n 0" runs them in one process, as a plain `pytest` does.
XDIST   ?= -n logical --dist loadgroup

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

test: $(STAMP)  ## the whole test suite (CPU, a pytest-xdist worker per CPU: 390 tests in 294 s and, on a fresh clone, 306 s on 2 cores, 2026-12-02)
	$(BIN)/python -m pytest -q $(XDIST) $(ARGS)

test-fast: $(STAMP)  ## skip the tests marked slow
	$(BIN)/python -m pytest -q -m "not slow" $(XDIST) $(ARGS)

bench: $(STAMP)  ## speed claims as side-by-side ratios → outputs/bench/latest.csv and README's Benchmarks block (~6 min)
	$(BIN)/python -m clipdiff.bench --readme $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check clipdiff tests

clean-venv:
	rm -rf $(VENV)
