"""Fault injection: every failure mode of the teacher ends in its documented outcome, and secrets stay secret."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from hegelion_queue import keys
from hegelion_queue.queue import store

from .redis_server import RedisServer
from .test_generator_e2e import wait_finished, workers  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e

# mode -> (reason of the dead letter or None for committed, text the error must contain)
OUTCOMES = {
    "ok": (None, ""),
    "exit75": ("teacher", "exited 75"),
    "hang": ("teacher", "timed out"),
    "garbage": ("teacher", "empty answer"),
    "empty": ("teacher", "empty answer"),
    "crash": ("teacher", "exited -9"),
    "huge": ("teacher", "output over"),
    "invalid": ("invalid_answer", "missing section"),
    "exit1": ("config", "LLM not set"),
}
# the same failures seen through a long-lived kimi (wire mode): JSON-RPC error replies, a broken protocol
WIRE_TEXT = {"exit75": "429", "garbage": "wrote garbage"}


@pytest.mark.parametrize("mode", ["wire", "print"])
def test_each_teacher_failure_mode_has_its_documented_outcome(
        hq, workers, redis_server, env, tmp_path, mode):  # noqa: F811
    prompts = tmp_path / "modes.txt"
    prompts.write_text("".join(f"Question about {m} [[fake:{m}]]\n" for m in OUTCOMES))
    hq("enqueue", "--prompts-file", str(prompts), "--run", "faults")
    workers(1, HEGELION_MAX_TRIES="2", HEGELION_TEACHER_TIMEOUT="1", HEGELION_TEACHER_OUTPUT_CAP="65536",
            FAKE_KIMI_HUGE_MB="4", HEGELION_KIMI_MODE=mode)
    r = redis_server.client()
    wait_finished(r, "faults", timeout=60)
    dead = {v["record"]["prompt"]: v for v in store.dead_letters_sync(r, keys.RunKeys("hegelion", "faults")).values()}
    hq("export", "--run", "faults", "--output", str(tmp_path / "f.jsonl"))
    done = {orjson.loads(line)["instruction"] for line in (tmp_path / "f.jsonl").read_bytes().splitlines()}
    for fault, (reason, text) in OUTCOMES.items():
        prompt = f"Question about {fault} [[fake:{fault}]]"
        if reason is None:
            assert prompt in done and prompt not in dead
            continue
        letter = dead[prompt]
        text = WIRE_TEXT.get(fault, text) if mode == "wire" else text
        assert letter["reason"] == reason and text in letter["error"], (fault, letter)
        # transient and invalid answers were retried up to HEGELION_MAX_TRIES; a config error is not retried
        assert letter["attempts"] == (1 if reason == "config" else 2), (fault, letter["attempts"])
    assert "short answer" in dead["Question about invalid [[fake:invalid]]"]["raw_output"]
    assert len(dead["Question about huge [[fake:huge]]"].get("raw_output", "")) <= 64 * 1024


def test_redis_password_end_to_end_and_no_secret_in_logs_or_status(hq, workers, tmp_path, monkeypatch):  # noqa: F811
    secret = "s3cr3t-pw-4-tests"
    server = RedisServer(tmp_path / "pw-redis", password=secret)
    server.start()
    try:
        url = server.url
        monkeypatch.setenv("HEGELION_REDIS_URL", url)
        from .conftest import ULTRA

        assert "enqueued 5" in hq("enqueue", "--dataset", str(ULTRA), "--limit", "5", "--run", "pw").stdout
        group = workers(1)
        wait_finished(server.client(), "pw", timeout=30)
        status = hq("status", "--run", "pw").stdout + hq("status", "--run", "pw", "--json").stdout
        group.stop(timeout=20)
        logs = "".join(p.read_text() for p in Path("artifacts/logs").glob("*.log"))
        assert "5 done" in status
        assert secret not in status and secret not in logs
        bad = hq("status", "--run", "pw", check=False, extra_env={"HEGELION_REDIS_URL": url.replace(secret, "nope")})
        assert bad.returncode == 1 and "nope" not in bad.stderr and "Traceback" not in bad.stderr
    finally:
        server.stop()
