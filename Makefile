# Two entry points for a fresh machine (see README.md):
#   make demo   -> venv + install, then the whole pipeline on synthetic phantoms
#   make test   -> venv + install, then the test suite (what .ci/run runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= out/demo
PYTEST_ARGS ?=

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): setup.cfg setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,tflite]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo --out=$(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -n auto --dist loadgroup --timeout=900 --durations=15 $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) out
