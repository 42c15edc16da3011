# dbscale: `make demo` runs the main job on the bundled data; `make test` runs lint and the test suite.
# Both create .venv on first use and install everything (the pinned CPU torch first, then dbscale).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dbscale-installed

.PHONY: install demo demo-masked test lint clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo "== installing into $(VENV) (torch first, so pip keeps the CPU build; about 2 minutes the first time)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	@bash tools/demo.sh

# The masked diffusion family end to end (text8-style characters, B=3): about 15 minutes on 2 CPU cores.
demo-masked: install
	@bash tools/demo_masked.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf runs/demo runs/demo_masked
