"""docker-compose.yml validates against the compose specification and holds no secret."""

import json
import re

import jsonschema
import pytest
import yaml

from .conftest import ROOT

# The project's shared copy when it is beside the checkout, else the copy committed with the tests.
SHARED = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
SCHEMA = SHARED if SHARED.exists() else ROOT / "tests" / "fixtures" / "compose-spec.json"


def test_compose_file_validates_against_the_spec():
    if not SCHEMA.exists():
        pytest.fail(f"compose schema missing at {SCHEMA}")
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    assert {"redis", "generator"} <= set(doc["services"])
    assert "appendonly yes" in doc["services"]["redis"]["command"]


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.workers.yml"])
def test_compose_files_validate_and_hard_code_no_secret(name):
    text = (ROOT / name).read_text()
    jsonschema.validate(yaml.safe_load(text), json.loads(SCHEMA.read_text()))
    assert "${REDIS_PASSWORD:?" in text
    assert not re.search(r"(requirepass|API_KEY|PASSWORD)\s*[:=]\s*[\"']?[A-Za-z0-9]{6,}", text)


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.workers.yml"])
def test_compose_redis_keeps_every_key(name):
    """An evicted job or sample is lost: a Redis the file starts runs with noeviction; a file whose Redis runs
    elsewhere says that it must."""
    text = (ROOT / name).read_text()
    servers = [s for s in yaml.safe_load(text)["services"].values() if "redis-server" in str(s.get("command", ""))]
    for service in servers:
        assert "--maxmemory-policy noeviction" in service["command"]
    assert servers or "maxmemory-policy noeviction" in text
