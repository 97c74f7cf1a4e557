# make run   - set everything up, then train the default experiment (configs/lenet.yaml); ARGS="--threads 1"
#              passes options on to cnnlab run, CONFIG=configs/... trains another experiment
# make test  - set everything up, then run the test suite
# Set-up: a virtual environment in .venv with pinned torch/torchvision and cnnlab installed
# editable (`make run`: what running needs; `make test`: the test extras too, Ray, MLflow,
# TensorBoard, onnxruntime, timm, pytest), and Fashion-MNIST (Debian's package, installed when
# missing and we are root; apt-get waits up to APT_LOCK_WAIT seconds, default 600, for another package manager).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
CONFIG ?= configs/lenet.yaml

.PHONY: run test data browser install bench clean help

run: data
	$(BIN)/cnnlab run $(CONFIG) $(ARGS)

test: $(TEST_STAMP) data browser
	$(BIN)/ruff check src tests scripts
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing PyTorch (torch 2.14.1, torchvision 0.29.1) into $(VENV): a large download, minutes of quiet"
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

data: $(STAMP)
	CNNLAB=$(BIN)/cnnlab scripts/ensure-data.sh

# Headless Chromium renders the HTML report in tests (Debian's package; installed when we are
# root, otherwise that one test is skipped with a note).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  scripts/apt-install.sh "for the HTML report rendering test" chromium; } || \
	  echo "chromium not installed: the HTML report rendering test will be skipped (sudo apt-get install chromium)"

bench: data
	$(BIN)/cnnlab bench configs/lenet.yaml

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

help:
	@sed -n '1,3p' Makefile
