# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: setup demo test test-all clean-demo

setup: $(STAMP)

# Re-installs only when pyproject.toml changed. Triton (pulled in by the CUDA build of torch, useless on
# CPU) is removed: importing it after TensorFlow segfaults, and torch runs without it.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[torch,test]'
	$(PY) -m pip uninstall -y -q triton
	touch $(STAMP)

demo: setup
	$(PY) scripts/demo.py --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ""

clean-demo:
	rm -rf $(DEMO_OUT)
