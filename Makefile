# maverick: make install | make test | make serve | make bench
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Per-test timeout (seconds); no test may hang CI.
TEST_TIMEOUT ?= 300
PYTEST_ARGS ?=

.PHONY: install test clean

install: $(VENV)/.installed

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	touch $@

test: install
	$(BIN)/python -m pytest tests --timeout=$(TEST_TIMEOUT) --durations=20 -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
