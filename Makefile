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

test: install
	$(BIN)/python -m pytest -q --durations=25 tests
