PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/cav: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/cav

install: $(BIN)/cav

demo: install
	$(BIN)/cav demo

# two test processes with one torch thread each (pytest-xdist): the suite is mostly single-threaded Python, so this
# uses both cores of a 2-core machine; every test builds its own tiny models and folders, nothing is shared
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --durations=25 tests
