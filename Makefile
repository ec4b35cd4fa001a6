# Two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS ?= test,bench,nuclei,torch,slurm,kubernetes,baselines,docs
STAMP  := $(VENV)/.installed

.PHONY: install chromium demo test test-fast bench docs clean

$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c .ci/constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP) chromium

# Debian's chromium, for the headless-browser tests of the report (tests/test_report.py): installed
# with apt-get where make runs as root (CI); elsewhere a note, and those tests skip. In CI
# (DASKPATH_STRICT_SKIPS=1, see .ci/run) a failed install stops the build.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium with apt-get (headless-browser tests of the report)"; \
	  { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
	    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || { echo "apt-get install chromium failed" >&2; \
	       [ -z "$$DASKPATH_STRICT_SKIPS" ] || [ "$$DASKPATH_STRICT_SKIPS" = 0 ]; }; \
	else \
	  echo "note: no chromium and not root with apt-get: the report's browser tests will skip"; \
	fi

demo: $(STAMP)
	$(BIN)/daskpath demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/bench_preprocess.py

docs: install
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) demo_out .pytest_cache
