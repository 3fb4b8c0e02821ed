# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   - the main job (see README)
#   make test   - the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# The CPU machines here carry these PyTorch wheels on local disk; a plain
# `torch` requirement would download several GB of CUDA libraries instead.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: demo test venv venv-test clean

$(VENV)/.runtime: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime setup.py
	$(PIP) install $(TORCH_PINS)
	$(PIP) install -e ".[test]" $(TORCH_PINS)
	touch $@

venv: $(VENV)/.runtime
venv-test: $(VENV)/.test

demo: $(VENV)/.runtime
	$(PY) -m keras_mobilevitv2.demo

test: $(VENV)/.test
	$(PY) -m pytest tests -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info demo_output
