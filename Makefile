# Two commands on a fresh machine: `make demo` (set up, run the pipeline on the embedded
# default) and `make test` (set up, lint, run the tests). Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-all test-fast lint docs deepsparse clean

setup: $(VENV)/.installed

# torch and torchvision come in through pyproject.toml's ranges; on machines with a pip
# constraint file they resolve to the releases that lie on local disk.
$(VENV)/.installed: pyproject.toml setup.py dnr_deploy/runtime/sparse/_kernels.cpp \
		dnr_deploy/runtime/sparse/_codegen.cpp dnr_deploy/runtime/sparse/_int8_kernels.cpp
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	# An independent AutoAttack (torchattacks, a port of the authors' code) for the test that
	# our ensemble is at least as strong. --no-deps: it pins an old `requests` it never imports;
	# its real needs (torch, numpy, scipy, tqdm) are already installed.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps "torchattacks==3.5.1"
	touch $@

# The whole pipeline on the embedded default: train, export, time, attack the artifact, and
# one summary of it all (a table, and report.html in the run dir).
demo: setup
	$(BIN)/dnr-compress
	$(BIN)/dnr-export --baseline
	$(BIN)/dnr-bench
	$(BIN)/dnr-verify
	$(BIN)/dnr-report

lint: setup
	$(BIN)/ruff check .

# What CI runs (about 7 minutes on this 2-core machine): every test but the slow ones, plus the
# slow ones marked ci (the full pipeline on the embedded default, crash, fuzz and hostile-input
# checks). test-all adds the rest: training-heavy ones (resume equality, torchrun, the
# attack-strength comparison, torchvision models end to end), about 20 more minutes.
test: lint
	$(BIN)/pytest -q -m "not slow or ci"

test-all: lint
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

# The pages no one types: docs/cli.md from the parsers, docs/results.md and README.md's
# results block from benchmarks/results/*.json (tests/test_docs_generated.py checks them).
docs: setup
	$(BIN)/python docs/generate.py all

# DeepSparse 1.8, for the sparse-engine benchmark's side-by-side column only (end of life, an
# evaluation-only licence: its own venv, never a dependency; benchmarks/deepsparse_worker.py).
deepsparse: .venv-deepsparse/.installed

.venv-deepsparse/.installed:
	$(PYTHON) -m venv .venv-deepsparse
	.venv-deepsparse/bin/pip install --quiet --disable-pip-version-check "deepsparse==1.8.0"
	touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache
