# The course's commands. `make run` runs the course end to end on the built-in data; `make test` runs the tests.
# `make` (or `make install`) creates .venv; its programs are then .venv/bin/mvae-course, .venv/bin/jupyter, ...
# (or `source .venv/bin/activate` first, and `mvae-course ...`, `python -m mvae_course ...` work as written).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.d/mvae-course.json

.DEFAULT_GOAL := install
.PHONY: install run site test test-fast reference lab grade clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar on -e '.[dev]'
	touch $(STAMP)

# JupyterLab's defaults for the course: no pop-up asking to fetch Jupyter news, no update check.
$(LAB_SETTINGS): Makefile
	mkdir -p $(dir $@)
	echo '{"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}}' > $@

install: $(STAMP) $(LAB_SETTINGS)

# make run RETRAIN=1: the lessons train their reference runs here (runs/retrained/) instead of loading them.
run: install
	$(PY) -m mvae_course course --out build $(if $(RETRAIN),--retrain)

# The course site again, from the lessons `make run` executed (build/notebooks), without running them.
site: install
	$(PY) -m mvae_course site --out build

# On a worker per core (pytest-xdist); tests/conftest.py keeps each test file in one worker, and the lessons, and
# the grading tests, each in one worker, as they share build/smoke/ and the grader's uids.
test: install
	$(PY) -m pytest -n auto --durations=15

# The inner loop: unit tests only (no notebook runs, no kernels, nothing marked slow), well under a minute.
test-fast: install
	$(PY) -m pytest tests -m "not slow"

# Train, export and evaluate every reference run the lessons load (resumable; skips those up to date).
reference: install
	$(PY) -m mvae_course reference --rebuild

# The whole repository, so that notebooks/ and exercises/ are both there; kernels on Unix sockets, not TCP.
# Jupyter refuses to run as root unless told (containers, CI machines).
lab: install
	$(VENV)/bin/jupyter lab --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/notebooks/00_setup.ipynb \
		--KernelManager.transport=ipc $(if $(filter 0,$(shell id -u)),--allow-root)

# make grade NB=exercises/01_elbo_exercises.ipynb (several: NB="exercises/01_*.ipynb exercises/02_*.ipynb")
grade: install
	@test -n "$(NB)" || { echo "usage: make grade NB=exercises/01_elbo_exercises.ipynb"; exit 2; }
	$(PY) -m mvae_course grade $(NB)

clean:
	rm -rf build runs .pytest_cache
