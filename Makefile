# Two commands on a fresh machine: `make demo` (set up + prepare + train the tiny preset) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/ml100k_mm
PREPARED ?= prepared/ml100k_mm
# The CPU build of torch for small machines. On a GPU machine install your CUDA build of torch into the venv
# first, or run: make install TORCH_SPEC="torch==2.13.0" PIP_TORCH_ARGS="--index-url <your CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
PRESET ?= tiny
ARGS ?=

.PHONY: install demo prepare train test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[pretrained,test]"
	touch $@

prepare: install
	$(BIN)/python -m jobs.prepare --preset $(PRESET) --set data.raw_dir=$(DATA) --set data.prepared_dir=$(PREPARED)

train: install
	$(BIN)/python -m jobs.train --preset $(PRESET) --set data.raw_dir=$(DATA) --set data.prepared_dir=$(PREPARED) $(ARGS)

demo: prepare train

test: install
	$(BIN)/python -m pytest -q --durations=15 tests

clean:
	rm -rf runs prepared mlflow.db mlartifacts
