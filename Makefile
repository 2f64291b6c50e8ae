# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv once; torch is pinned to the CPU build this machine carries.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/selfspeech demo --out runs/demo

test: $(VENV)/.installed
	$(VENV)/bin/pytest -q
