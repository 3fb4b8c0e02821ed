# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   - the main job: train -> QAT -> int8 TFLite -> audit -> accuracy table
#   make test   - the test suite, against the package installed from its wheel
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# The CPU machines here carry these PyTorch wheels on local disk; a plain
# `torch` requirement would download several GB of CUDA libraries instead.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# Test processes (pytest-xdist), a test file to each: most tests keep about one
# core busy, so on a 2-core machine two finish well before one. Each holds
# several GB of memory at its peak; `make test PYTEST_WORKERS=0` runs in one process.
PYTEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(PYTEST_WORKERS)),-p no:xdist,-n $(PYTEST_WORKERS) --dist loadfile)
SOURCES := setup.py pyproject.toml MANIFEST.in $(shell find keras_mobilevitv2 training quantization -name '*.py' -o -name '*.json')

.PHONY: demo test test-slow lint wheel venv venv-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The package is installed from its wheel (not in editable mode), so the
# tests exercise exactly what `pip install` gives a user.
wheel: dist/.built
dist/.built: $(SOURCES) $(PY)
	rm -rf dist build *.egg-info
	$(PIP) wheel --no-deps -w dist .
	touch $@

$(VENV)/.runtime: dist/.built
	$(PIP) install --force-reinstall --no-deps dist/keras_mobilevitv2-*.whl
	$(PIP) install dist/keras_mobilevitv2-*.whl
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) install $(TORCH_PINS)
	$(PIP) install "$$(ls dist/keras_mobilevitv2-*.whl)[test]" $(TORCH_PINS)
	touch $@

venv: $(VENV)/.runtime
venv-test: $(VENV)/.test

$(VENV)/.demo: $(VENV)/.runtime
	$(PIP) install "$$(ls dist/keras_mobilevitv2-*.whl)[demo]"
	touch $@

demo: $(VENV)/.demo
	$(PY) -m quantization.pipeline

test: $(VENV)/.test
	cd / && $(abspath $(PY)) -c "import keras_mobilevitv2, training, quantization; print('installed:', keras_mobilevitv2.__file__)"
	KERAS_MOBILEVITV2_TEST_INSTALLED=1 $(VENV)/bin/pytest tests -q -p no:cacheprovider $(XDIST) $(PYTEST_ARGS)

# The tests marked slow (left out of `make test` to keep it under ~30 min on
# 2 cores); CI runs them too, as they fit its time limit.
test-slow: $(VENV)/.test
	KERAS_MOBILEVITV2_TEST_INSTALLED=1 $(VENV)/bin/pytest tests -q -p no:cacheprovider -m slow $(XDIST) $(PYTEST_ARGS)

# The formatter and linter settings are in pyproject.toml; `ruff format .`
# and `ruff check --fix .` apply them.
lint: $(VENV)/.test
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info demo_output runs/pipeline
