# The course's commands. `make run` runs the course end to end on the built-in data; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast reference lab clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m mvae_course course --out build

test: $(STAMP)
	$(PY) -m pytest --durations=15

# The inner loop: unit tests only (no notebook runs, no kernels, nothing marked slow), well under a minute.
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

# Train, export and evaluate every reference run the lessons load (resumable; skips those up to date).
reference: $(STAMP)
	$(PY) -m mvae_course reference --rebuild

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf build runs .pytest_cache
