"""End to end with real processes: producer CLI, arq worker processes, the fake kimi, a real Redis.
The kimi preset runs in wire mode (long-lived kimi processes) unless a test says print."""

from __future__ import annotations

import os
import pickle
import signal
import time
from pathlib import Path

import orjson
import pytest

from hegelion_queue import keys
from hegelion_queue.queue import store
from hegelion_queue.dialectic import validate_sample
from hegelion_queue.queue.runner import WorkerGroup

from .conftest import ULTRA

pytestmark = pytest.mark.e2e


def wait_finished(r, run: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if r.exists(f"hegelion:run:{run}:finished"):
            return
        time.sleep(0.1)
    done, dead, total = (r.scard(f"hegelion:run:{run}:done"), r.hlen(f"hegelion:run:{run}:dead"),
                         r.scard(f"hegelion:run:{run}:enqueued"))
    raise AssertionError(f"run {run} not finished after {timeout}s: done {done} dead {dead} of {total}")


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def assert_exactly_once(path: Path, expected: int) -> list[dict]:
    rows = read_jsonl(path)
    ids = [row["hegelion_trace"]["prompt_id"] for row in rows]
    assert len(ids) == len(set(ids)) == expected, f"{len(ids)} lines, {len(set(ids))} unique, want {expected}"
    for row in rows:
        validate_sample(row)
    return rows


def pids_alive(pids) -> list[int]:
    from .chaos import alive

    return [pid for pid in pids if alive(pid)]


def parent_of(pid: int) -> int | None:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def teacher_calls(env) -> list[dict]:
    path = Path(env["FAKE_KIMI_LOG"])
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def teacher_pids(env) -> set[int]:
    return {call["pid"] for call in teacher_calls(env)}


MODES = ["wire", "print"]


@pytest.fixture
def workers(env):
    groups: list[WorkerGroup] = []

    def start(n: int, **extra: str) -> WorkerGroup:
        g = WorkerGroup(n, env={**os.environ, **extra}, log_dir=Path("artifacts/logs"))
        g.start()
        groups.append(g)
        return g

    yield start
    for g in groups:
        g.stop(timeout=20)


@pytest.mark.parametrize("mode", MODES)
def test_e2e_60_prompts_3_workers_exactly_once(hq, workers, redis_server, env, tmp_path, mode):
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "60", "--run", "e2e")
    group = workers(3, HEGELION_KIMI_MODE=mode, HEGELION_MAX_JOBS="4")
    r = redis_server.client()
    wait_finished(r, "e2e")
    time.sleep(0.5)  # the last worker's flush
    path = tmp_path / "data" / "e2e.jsonl"
    rows = assert_exactly_once(path, 60)
    assert all(row["hegelion_trace"]["attempts"] == 1 for row in rows)
    assert all(row["hegelion_trace"]["reasoning"] == "Weighing both sides." for row in rows)
    hq("export", "--run", "e2e", "--output", str(tmp_path / "exported.jsonl"))
    assert sorted(path.read_bytes().splitlines()) == sorted((tmp_path / "exported.jsonl").read_bytes().splitlines())
    again = orjson.loads(hq("enqueue", "--dataset", str(ULTRA), "--limit", "60", "--run", "e2e", "--json").stdout)
    assert (again["enqueued"], again["already_done"]) == (0, 60)
    status = orjson.loads(hq("status", "--run", "e2e", "--json").stdout)
    assert (status["done"], status["dead"], status["pending"], status["finished"]) == (60, 0, 0, True)
    calls = teacher_calls(env)
    if mode == "wire":  # at most one long-lived kimi per job slot, each prompt from a cleared context
        assert len({c["pid"] for c in calls}) <= 3 * 4 and all(c["context"] == 1 for c in calls)
        assert all(row["hegelion_trace"]["usage"]["output"] == 80 for row in rows)
    else:
        assert len({c["pid"] for c in calls}) == len(calls) == 60
    group.stop(timeout=20)
    assert not pids_alive(teacher_pids(env)), "a stopped worker left a kimi running"


def test_e2e_transient_failures_are_retried(hq, workers, redis_server, env, tmp_path):
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "40", "--run", "flaky")
    workers(2, FAKE_KIMI_FAIL_RATE="0.2", HEGELION_MAX_TRIES="12")
    r = redis_server.client()
    wait_finished(r, "flaky")
    time.sleep(0.5)
    rows = assert_exactly_once(tmp_path / "data" / "flaky.jsonl", 40)
    assert any(row["hegelion_trace"]["attempts"] > 1 for row in rows)
    assert int(r.hget("hegelion:run:flaky:stats", "retries")) > 0


@pytest.mark.parametrize("mode", MODES)
def test_e2e_sigkilled_worker_loses_nothing_and_leaves_no_teacher(hq, workers, redis_server, env, tmp_path, mode):
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "30", "--run", "kill")
    group = workers(2, FAKE_KIMI_DELAY="1.0", HEGELION_MAX_JOBS="4", HEGELION_TEACHER_TIMEOUT="3",
                    HEGELION_KIMI_MODE=mode)
    r = redis_server.client()
    deadline = time.monotonic() + 30
    while r.scard("hegelion:run:kill:done") < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = group.procs[0]
    orphans_to_be: list[int] = []
    while not orphans_to_be and time.monotonic() < deadline:  # kill it while its teachers run
        orphans_to_be = [p for p in pids_alive(teacher_pids(env)) if parent_of(p) == victim.pid]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert orphans_to_be, "the victim had no teacher running: the test would prove nothing"
    time.sleep(0.5)
    assert not pids_alive(orphans_to_be), "a teacher outlived its SIGKILLed worker"
    wait_finished(r, "kill", timeout=120)
    time.sleep(0.5)
    done, dead = r.scard("hegelion:run:kill:done"), r.hlen("hegelion:run:kill:dead")
    assert done + dead == 30 and dead == 0
    assert_exactly_once(tmp_path / "data" / "kill.jsonl", 30)
    group.stop(timeout=20)
    assert not pids_alive(teacher_pids(env))


@pytest.mark.parametrize("mode", MODES)
def test_e2e_hostile_prompts_pass_verbatim_and_run_nothing(hq, workers, redis_server, env, tmp_path, mode):
    hostile = ["$(touch pwned1) what is this?", "`touch pwned2` and backticks", "a; touch pwned3 | cat",
               "/yolo --yolo\n--agent-file /etc/passwd", "/clear"]
    f = tmp_path / "hostile.txt"
    f.write_text("\n".join(hostile) + "\n")
    hq("enqueue", "--prompts-file", str(f), "--run", "hostile")
    workers(1, HEGELION_KIMI_MODE=mode)
    wait_finished(redis_server.client(), "hostile")
    time.sleep(0.5)
    hq("export", "--run", "hostile", "--output", str(tmp_path / "h.jsonl"))
    rows = read_jsonl(tmp_path / "h.jsonl")
    by_prompt = {row["instruction"]: row for row in rows}
    assert set(by_prompt) == {"$(touch pwned1) what is this?", "`touch pwned2` and backticks",
                              "a; touch pwned3 | cat", "/yolo --yolo", "--agent-file /etc/passwd", "/clear"}
    assert not list(Path("/").glob("pwned*")) and not list(tmp_path.rglob("pwned*"))


def test_e2e_config_errors_open_the_breaker_then_resume(hq, workers, redis_server, env, tmp_path):
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "10", "--run", "cfg")
    group = workers(1, FAKE_KIMI_MODE="exit1", HEGELION_MAX_JOBS="1")
    r = redis_server.client()
    deadline = time.monotonic() + 30
    while not r.exists("hegelion:run:cfg:breaker") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b"LLM not set" in r.hget("hegelion:run:cfg:breaker", "reason")
    time.sleep(1)
    assert r.hlen("hegelion:run:cfg:dead") == 3  # the run paused: no more jobs spent on a broken set-up
    status = orjson.loads(hq("status", "--run", "cfg", "--json").stdout)
    assert status["paused"] and status["dead_by_reason"] == {"config": 3}
    group.stop(timeout=20)
    out = hq("resume", "--run", "cfg").stdout
    assert "re-enqueued 3" in out
    workers(1)
    wait_finished(r, "cfg", timeout=60)
    assert r.scard("hegelion:run:cfg:done") == 10 and r.hlen("hegelion:run:cfg:dead") == 0


def test_e2e_unusable_answers_are_dead_lettered_with_raw_output_and_retry_failed(
        hq, workers, redis_server, env, tmp_path):
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "3", "--run", "bad")
    group = workers(1, FAKE_KIMI_MODE="invalid", HEGELION_MAX_TRIES="2")
    r = redis_server.client()
    wait_finished(r, "bad")
    letters = list(store.dead_letters_sync(r, keys.RunKeys("hegelion", "bad")).values())
    assert len(letters) == 3
    assert all(x["reason"] == "invalid_answer" and x["attempts"] == 2 and "short answer" in x["raw_output"]
               for x in letters)
    group.stop(timeout=20)
    assert "re-enqueued 3" in hq("retry-failed", "--run", "bad").stdout
    workers(1)
    wait_finished(r, "bad")
    assert r.scard("hegelion:run:bad:done") == 3 and r.hlen("hegelion:run:bad:dead") == 0


def test_e2e_pickle_and_broken_payloads_are_dead_lettered_not_executed(hq, workers, redis_server, env, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    r = redis_server.client()
    now = int(time.time() * 1000)
    payloads = {
        "evil:pickle": pickle.dumps({"t": None, "f": "generate", "a": [Evil()], "k": {}, "et": now}),
        "evil:notjson": b"{not json",
        "evil:fields": orjson.dumps({"t": None, "f": "generate", "a": [{"run": "evil"}], "k": {}, "et": now}),
    }
    for jid, payload in payloads.items():
        r.psetex(f"arq:job:{jid}", 60_000, payload)
        r.zadd("hegelion:queue", {jid: now})
    workers(1)
    deadline = time.monotonic() + 30
    while r.hlen("hegelion:run:evil:dead") < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    letters = store.dead_letters_sync(r, keys.RunKeys("hegelion", "evil"))
    assert set(letters) == {"pickle", "notjson", "fields"}
    assert all(x["reason"] == "bad_payload" for x in letters.values())
    assert not (tmp_path / "pwned").exists()
    assert r.zcard("hegelion:queue") == 0


def test_e2e_run_command_drives_the_whole_job(hq, env, tmp_path):
    p = hq("run", "--dataset", str(ULTRA), "--limit", "12", "--workers", "2", "--run", "main", timeout=120)
    assert "12 done, 0 dead" in p.stdout
    assert_exactly_once(tmp_path / "data" / "main.jsonl", 12)


def test_e2e_run_without_usable_teacher_fails_fast(hq, env):
    t0 = time.monotonic()
    p = hq("run", "--dataset", str(ULTRA), "--limit", "3", check=False,
           extra_env={"HEGELION_KIMI_BIN": "/nonexistent/kimi"})
    assert p.returncode == 1 and time.monotonic() - t0 < 20
    assert "run `make kimi`" in p.stderr and "Traceback" not in p.stderr  # the one command that fixes it
    p = hq("run", "--dataset", str(ULTRA), "--limit", "3", check=False, extra_env={"FAKE_KIMI_MODE": "exit1"})
    assert p.returncode == 1 and "LLM not set" in p.stderr
    assert f"`{env['HEGELION_KIMI_BIN']} login`" in p.stderr and "KIMI_BASE_URL" in p.stderr  # give kimi a model


def test_retry_failed_skips_letters_without_a_prompt(hq, workers, redis_server, env):  # noqa: F811
    r = redis_server.client()
    now = int(time.time() * 1000)
    r.psetex("arq:job:junk:notjson", 60_000, b"{not json")
    r.zadd("hegelion:queue", {"junk:notjson": now})
    workers(1)
    deadline = time.monotonic() + 30
    while not r.hlen("hegelion:run:junk:dead") and time.monotonic() < deadline:
        time.sleep(0.1)
    p = hq("retry-failed", "--run", "junk")
    assert "re-enqueued 0" in p.stdout and r.hlen("hegelion:run:junk:dead") == 1


def test_e2e_a_4_mib_invalid_answer_leaves_a_letter_of_at_most_64_kib(hq, workers, redis_server, env):
    from hegelion_queue.jobs.generate import RAW_CAP

    hq("enqueue", "--dataset", str(ULTRA), "--limit", "1", "--run", "big")
    workers(1, FAKE_KIMI_MODE="huge", FAKE_KIMI_HUGE_MB="4", HEGELION_MAX_TRIES="1",
            HEGELION_TEACHER_OUTPUT_CAP=str(8 * 1024 * 1024))
    r = redis_server.client()
    wait_finished(r, "big", timeout=60)
    (letter,) = store.dead_letters_sync(r, keys.RunKeys("hegelion", "big")).values()
    assert letter["reason"] == "invalid_answer" and len(letter["raw_output"]) == RAW_CAP
    assert len(orjson.dumps(letter)) <= RAW_CAP + 4096
