# Two entry points for a fresh clone: `make demo` (the main job) and `make test` (what CI runs).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup browser

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: anything else would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[train,serve,demo,eval,dev]"
	touch $(STAMP)

setup: $(STAMP)

# The world model the package ships (a default run of the whole recipe on the synthetic world) answers held-out
# questions about world images, beside its blind twin's numbers; in a terminal, a chat follows.
demo: $(STAMP)
	$(BIN)/sphinx-mllm world demo --draw runs/world-demo --chat

# Debian's chromium + node + playwright-core for the web demo's browser test (idempotent).
browser:
	bash scripts/setup_browser.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/lint-imports

test: lint browser
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" --timeout 900
