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
# uses both cores of a 2-core machine. Whole files go to one process (--dist loadfile): test_batch.py's Ray clusters
# then never run two at a time (in a run that split the file over both, beside a training job, one of its tests took
# 248 s instead of 20), and a module's fixtures are built once.
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25 tests
