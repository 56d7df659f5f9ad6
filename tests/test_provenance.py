"""Provenance: each run stores its configuration once, every sample names it by a short id, a changed configuration
is refused unless allowed (then both are kept), and the commands that made the run are recorded."""

from __future__ import annotations

import orjson
import pytest

from hegelion_queue.dataset import provenance
from hegelion_queue.settings import Settings

from .conftest import ULTRA, queued_records
from .test_generator_e2e import read_jsonl, wait_finished, workers  # noqa: F401


def configs(r, run: str) -> dict[str, dict]:
    return {k.decode(): orjson.loads(v) for k, v in r.hgetall(f"hegelion:run:{run}:configs").items()}


def test_configuration_names_teacher_version_model_prompts_parser_and_sampling(env):
    s = Settings()
    c = provenance.configuration(s, {"seed": 1, "dataset": "d"})
    assert c["teacher"] == {"preset": "kimi", "version": "kimi, version 1.51.0 (fake)", "model": "kimi-default",
                            "endpoint": ""}
    assert len(c["system_prompt_sha256"]) == 64 and c["parser"] == {"min_section_chars": 20}
    cid = provenance.config_id(c)
    assert len(cid) == 16 and cid == provenance.config_id(orjson.loads(orjson.dumps(c)))
    command = Settings(teacher="command", teacher_cmd="llm -m 'gpt 4o'")
    assert provenance.configuration(command, {})["teacher"]["version"] == "llm -m 'gpt 4o'"
    missing = Settings(kimi_bin="/nonexistent/kimi")
    assert provenance.teacher_version(missing).startswith("unavailable (FileNotFoundError")


@pytest.mark.parametrize("change,field", [
    ({"extra_env": {"HEGELION_KIMI_MODEL": "kimi-k2-other"}}, "teacher.model: 'kimi-default' -> 'kimi-k2-other'"),
    ({"args": ["--seed", "7"]}, "sampling.seed: 42 -> 7"),
    ({"extra_env": {"HEGELION_MIN_SECTION_CHARS": "50"}}, "parser.min_section_chars: 20 -> 50"),
])
def test_a_changed_configuration_is_refused_unless_allowed(hq, redis_server, change, field):
    r = redis_server.client()
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "3", "--run", "prov")
    first = r.hget("hegelion:run:prov:meta", "config_id").decode()
    jobs = r.zcard("hegelion:queue")
    args = ["enqueue", "--dataset", str(ULTRA), "--limit", "5", "--run", "prov", *change.get("args", [])]
    refused = hq(*args, check=False, extra_env=change.get("extra_env"))
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"run prov was made with configuration {first}" in refused.stderr and field in refused.stderr
    assert "--allow-config-change" in refused.stderr
    assert r.zcard("hegelion:queue") == jobs and list(configs(r, "prov")) == [first]  # nothing written
    assert len(r.lrange("hegelion:run:prov:commands", 0, -1)) == 1

    added = orjson.loads(hq(*args, "--allow-config-change", "--json", extra_env=change.get("extra_env")).stdout)
    second = r.hget("hegelion:run:prov:meta", "config_id").decode()
    assert second != first and set(configs(r, "prov")) == {first, second}  # both recorded
    records = queued_records(r, "prov")
    assert [p["config_id"] for p in records].count(second) == added["enqueued"] > 0  # the new prompts
    commands = [orjson.loads(x)["command"] for x in r.lrange("hegelion:run:prov:commands", 0, -1)]
    assert commands[-1].startswith("hegelion-queue enqueue --dataset") and "--allow-config-change" in commands[-1]


@pytest.mark.e2e
def test_e2e_every_sample_carries_the_run_configuration_id(hq, workers, redis_server, env, tmp_path):  # noqa: F811
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "6", "--run", "carried")
    r = redis_server.client()
    cid = r.hget("hegelion:run:carried:meta", "config_id").decode()
    workers(1)
    wait_finished(r, "carried")
    rows = read_jsonl(tmp_path / "data" / "carried.jsonl")
    assert len(rows) == 6 and {row["hegelion_trace"]["config_id"] for row in rows} == {cid}
    assert configs(r, "carried")[cid]["config"]["teacher"]["version"] == "kimi, version 1.51.0 (fake)"
