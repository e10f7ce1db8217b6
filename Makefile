# metalens: `make run` sets up .venv and runs the tour; `make test` sets up .venv and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of PyTorch, installed before anything else so that pip never
# resolves torch to a multi-GB CUDA build. Any torch >= 2.4 works for users.
TORCH ?= torch==2.13.0

.PHONY: run test install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/metalens tour --out runs/tour

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
