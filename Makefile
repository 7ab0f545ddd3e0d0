# One command each: `make run` sets up .venv and runs the pipeline's Prefect flow; `make test` lints
# and runs the tests.
# The offline CIFAR-10 mirror (sha256 below) is used when SOURCE points at it, e.g.
#   make run SOURCE=../shared/data/cifar10-jpeg.tar.gz
PYTHON ?= python3
VENV ?= .venv
SOURCE ?=
ARGS ?=
SHA256 ?= d877bdec11f54282b92da36e9f045bd305d663b1223e3822baff39ca9ff6690a
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup run quick test test-fast lock cli-docs

# Every dependency at the version requirements.lock names (its hashes checked), then the project
# itself without dependencies: a fresh machine gets the environment the tests passed on.
$(BIN)/dvc: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/python -c 'from pipelines.compare import offline_plots_template; offline_plots_template()'
	touch $@

setup: $(BIN)/dvc

# The Prefect flow (a temporary local API and SQLite unless PREFECT_API_URL names a server); ARGS
# are passed on, e.g. make run ARGS='-S train.epochs=3'.
run: setup
	$(BIN)/cifar10-pipeline run $(if $(SOURCE),-S 'download.source=$(SOURCE)' -S download.md5=null -S 'download.sha256=$(SHA256)') $(ARGS)

# A quick look at every stage's output: one epoch on 100 training and 50 test images per class.
QUICK := -S train.epochs=1 -S prepare.train_limit_per_class=100 -S prepare.test_limit_per_class=50 -S evaluate.tta_translate=0
quick: setup
	$(MAKE) --no-print-directory run ARGS="$(QUICK) $(ARGS)"

# Two test processes (TEST_JOBS=0 for one): each takes whole test files, so a module's fixtures
# (a pipeline run per module) are built once and its tests keep their order. Files go out in
# collection order, longest first (tests/conftest.py), not xdist's default of most tests first.
TEST_JOBS ?= 2

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder

# The unit layer: no training, no Prefect server, no browser (docs/development.md, Tests).
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder -m 'not slow'

# Refresh requirements.lock from pyproject.toml with the newest releases its ranges allow (uv, in a
# folder of its own so it stays out of the locked environment); then `make test` before committing.
LOCK_TOOLS := $(VENV)/lock-tools
lock:
	test -x $(LOCK_TOOLS)/bin/uv || ($(PYTHON) -m venv $(LOCK_TOOLS) && $(LOCK_TOOLS)/bin/pip install --quiet uv==0.13.9)
	$(LOCK_TOOLS)/bin/uv pip compile pyproject.toml --extra test --upgrade --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--custom-compile-command 'make lock' --output-file requirements.lock

# docs/cli.md from the app by typer's own generator (tests/test_project.py fails when it drifts).
cli-docs: setup
	$(BIN)/typer pipelines.cli utils docs --name cifar10-pipeline --title 'Command reference' --output docs/cli.md
