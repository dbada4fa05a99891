"""docker/ cannot run here (no Docker engine): check its files against their schema."""
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / ".cache" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose_schema():
    if not SCHEMA.exists():
        pytest.fail(f"{SCHEMA} is missing: run `make test` (it fetches the compose-spec schema with npm)")
    return json.loads(SCHEMA.read_text())


def test_compose_file_is_valid(compose_schema):
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    jsonschema.Draft201909Validator(compose_schema).validate(compose)
    services = compose["services"]
    assert {"rabbitmq", "postgres", "core", "transfer", "execute", "beat", "flower"} <= set(services)
    # Every queue is consumed by some worker; exactly one beat.
    from mqi_celery.tasks import QUEUES

    consumed = {q for s in services.values() if s.get("command", [None])[0] == "worker"
                for q in s["command"][s["command"].index("-Q") + 1].split(",")}
    assert consumed == set(QUEUES)
    assert sum(1 for s in services.values() if s.get("command", [None])[0] == "beat") == 1


def test_schema_rejects_a_misspelt_key(compose_schema):
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    compose["services"]["core"]["comand"] = ["worker"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft201909Validator(compose_schema).validate(compose)


def test_dockerfile_copies_existing_files():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    assert sources and all((ROOT / s).exists() for s in sources), sources
