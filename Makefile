# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv once; torch is pinned to the CPU build this machine carries,
# every other package to the version in $(LOCK), so the committed figures reproduce.
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt
# `make lock` re-resolves $(LOCK) from pyproject.toml (dependencies and the dev extra) with the
# newest releases up to this date; move it forward to take newer ones, then rerun the demo
LOCK_DATE := 2026-11-22T07:00:00Z

$(VENV)/.installed: pyproject.toml $(LOCK) requirements/parity.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c $(LOCK) -e '.[dev]'
# reference implementations of the parity tests, without their declared dependencies:
# speechbrain's torchaudio would replace the torch above, pyctcdecode's numpy<2 is stale
	$(PY) -m pip install -q --no-deps -r requirements/parity.txt
	touch $@

.PHONY: install demo test lock
install: $(VENV)/.installed

# The lock names torch==2.13.0 without the +cpu label, which matches the CPU build installed above
# and keeps the file usable where only PyPI's build exists. Where the CPU wheel is on disk it is resolved
# with its own metadata (PyPI's build would add the CUDA packages to the lock).
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv==0.13.9
	printf '$(if $(wildcard /opt/wheels),torch==2.13.0+cpu,torch==2.13.0)\n' | $(VENV)/bin/uv pip compile pyproject.toml - --extra dev --python-version 3.11 \
	    $(if $(wildcard /opt/wheels),--find-links /opt/wheels) --exclude-newer $(LOCK_DATE) \
	    --custom-compile-command 'make lock' -q -o $(LOCK)
	sed -i 's/^torch==\([^+]*\)+cpu$$/torch==\1/' $(LOCK)

demo: $(VENV)/.installed
	$(VENV)/bin/selfspeech demo --out runs/demo

test: $(VENV)/.installed
	$(VENV)/bin/pytest -q
