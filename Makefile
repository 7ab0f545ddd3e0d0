# One command each: `make run` sets up .venv and runs the pipeline's Prefect flow; `make test` lints
# and runs the tests.
# The offline CIFAR-10 mirror (sha256 below) is used when SOURCE points at it, e.g.
#   make run SOURCE=../shared/data/cifar10-jpeg.tar.gz
PYTHON ?= python3
VENV ?= .venv
SOURCE ?=
SHA256 ?= d877bdec11f54282b92da36e9f045bd305d663b1223e3822baff39ca9ff6690a
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup run test

$(BIN)/dvc: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/python -c 'from pipelines.compare import offline_plots_template; offline_plots_template()'
	touch $@

setup: $(BIN)/dvc

# The Prefect flow (Prefect's temporary local API and SQLite unless PREFECT_API_URL names a server).
run: setup
	$(BIN)/cifar10-pipeline run $(if $(SOURCE),-S 'download.source=$(SOURCE)' -S download.md5=null -S 'download.sha256=$(SHA256)')

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest
