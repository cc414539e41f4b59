# Two commands do the work on a fresh clone:  make demo  and  make test
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0

.PHONY: test demo lint setup clean

# The venv is built once; the stamp is refreshed whenever pyproject.toml changes.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	# torch first: a bare `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

# Until the built-in demo models land, the demo shows what works today: exact parity with transformers.
demo: $(BIN)/.installed
	TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 $(BIN)/python examples/parity.py

lint: $(BIN)/.installed
	$(BIN)/ruff check vlmkit tests examples benchmarks
	$(BIN)/ruff format --check vlmkit tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
