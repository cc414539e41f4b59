# Two commands do the work on a fresh clone:  make demo  and  make test
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0

.PHONY: test demo demo-models demo-model-vipllava demo-model-idefics lint setup clean soak

# The venv is built once; the stamp is refreshed whenever pyproject.toml changes.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	# torch first: a bare `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# lmms-eval (the vlmkit model entry's test) without its requirements, which would replace torch
	$(BIN)/python -m pip install --quiet --no-deps "lmms-eval==0.6.1"
	touch $@

setup: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

# The built-in demo models answer questions about hand-made pictures with visual prompts (offline).
demo: $(BIN)/.installed
	@HF_HUB_OFFLINE=1 VLMKIT=$(BIN)/vlmkit examples/demo.sh

# Rebuild the built-in demo models from nothing (tokenizer, data, training, held-out accuracy), both at once.
demo-models: $(BIN)/.installed
	$(BIN)/python -m vlmkit.demo.shapes --handmade
	$(MAKE) -j2 demo-model-vipllava demo-model-idefics

DEMO_BUILD := OMP_NUM_THREADS=1 $(BIN)/python -m vlmkit.demo.build --rows 16000 --steps 5000 --install

demo-model-vipllava: $(BIN)/.installed
	rm -rf build/demo-vipllava
	$(DEMO_BUILD) build/demo-vipllava --family vipllava --render-sizes 96

demo-model-idefics: $(BIN)/.installed
	rm -rf build/demo-idefics
	$(DEMO_BUILD) build/demo-idefics --family idefics

# The server under 16 clients of mixed good, bad, streaming and abandoned traffic (CI: 2 minutes).
SOAK_SECONDS ?= 120
soak: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/soak.py --duration $(SOAK_SECONDS)

lint: $(BIN)/.installed
	$(BIN)/ruff check vlmkit tests examples benchmarks fuzz scripts
	$(BIN)/ruff format --check vlmkit tests examples benchmarks fuzz scripts

clean:
	rm -rf $(VENV) build *.egg-info
