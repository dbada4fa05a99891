# Two commands do everything on a fresh machine:
#   make run    the whole pipeline on the embedded default (no services needed)
#   make test   the whole test suite (needs root for the sshd + Slurm testbed packages)
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: run test install testbed clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/mqi --config conf/default.yaml run

testbed:
	bash tests/testbed/install.sh

test: install testbed
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf var/ build/ *.egg-info
