"""Never pay twice: the answer cache across runs, `estimate` before a run, cost kept with the run. Real Redis, real
workers, the fake teacher's log counting the calls."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from .conftest import ULTRA
from .test_generator_e2e import assert_exactly_once, read_jsonl, teacher_calls, wait_finished, workers  # noqa: F401

pytestmark = pytest.mark.e2e


def test_a_run_over_prompts_answered_before_calls_the_teacher_only_for_the_new_ones(hq, workers, redis_server,  # noqa: F811
                                                                                  env):
    r = redis_server.client()
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "40", "--run", "first")
    group = workers(2)
    wait_finished(r, "first", timeout=60)
    assert len(teacher_calls(env)) == 40

    hq("enqueue", "--dataset", str(ULTRA), "--limit", "60", "--run", "second")  # the same 40, and 20 more
    wait_finished(r, "second", timeout=60)
    group.stop()
    assert len(teacher_calls(env)) == 60, "20 calls for the 20 new prompts, none for the 40 answered before"
    hq("export", "--run", "second")
    rows = assert_exactly_once(Path(env["HEGELION_DATA_DIR"]) / "second.jsonl", 60)
    reused = [row for row in rows if row["hegelion_trace"].get("cached")]
    assert len(reused) == 40 and all(row["hegelion_trace"]["cached"]["run"] == "first" for row in reused)
    assert all(row["hegelion_trace"]["run"] == "second" and row["hegelion_trace"]["usage"] == {} for row in reused)
    st = orjson.loads(hq("status", "--run", "second", "--json").stdout)
    assert st["cached"] == 40 and st["done"] == 60
    assert st["budget"]["calls"]["spent"] == 20, "a reused answer spends nothing"
    assert "40 answers reused from the answer cache" in hq("status", "--run", "second").stdout


def test_no_cache_a_changed_teacher_and_a_purged_run_all_miss(hq, workers, redis_server, env):  # noqa: F811
    r = redis_server.client()
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "10", "--run", "a")
    group = workers(1)
    wait_finished(r, "a", timeout=60)
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "10", "--run", "b", "--no-cache")
    wait_finished(r, "b", timeout=60)
    assert len(teacher_calls(env)) == 20, "--no-cache: every prompt calls the teacher"
    group.stop()

    hq("enqueue", "--dataset", str(ULTRA), "--limit", "10", "--run", "c", extra_env={"HEGELION_MIN_SECTION_CHARS": "21"})
    group = workers(1, HEGELION_MIN_SECTION_CHARS="21")  # another parser: another teacher configuration
    wait_finished(r, "c", timeout=60)
    assert len(teacher_calls(env)) == 30
    group.stop()

    hq("purge", "--run", "a", "--yes")
    hq("purge", "--run", "c", "--yes")
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "10", "--run", "d")  # a's answers are gone: misses, no error
    workers(1)
    wait_finished(r, "d", timeout=60)
    assert len(teacher_calls(env)) == 40 and r.scard("hegelion:run:d:done") == 10


def test_estimate_enqueues_nothing_and_uses_what_earlier_runs_measured(hq, workers, redis_server, env):  # noqa: F811
    r = redis_server.client()
    prices = {"HEGELION_PRICE_INPUT_PER_MTOK": "2", "HEGELION_PRICE_OUTPUT_PER_MTOK": "8"}
    cold = orjson.loads(hq("estimate", "--dataset", str(ULTRA), "--limit", "30", "--run", "est", "--json",
                           extra_env=prices).stdout)
    assert r.zcard("hegelion:queue") == 0 and not r.exists("hegelion:run:est:enqueued"), "nothing enqueued"
    assert cold["prompts"] == 30 and cold["teacher_calls"] == 30 and cold["cache_hits"] == 0
    assert cold["output_tokens"] == 30 * 700 and "defaults" in cold["basis"]
    assert cold["cost"] == pytest.approx(cold["input_tokens"] / 1e6 * 2 + cold["output_tokens"] / 1e6 * 8, abs=1e-4)

    hq("enqueue", "--dataset", str(ULTRA), "--limit", "10", "--run", "measured")
    workers(1)
    wait_finished(r, "measured", timeout=60)
    warm = orjson.loads(hq("estimate", "--dataset", str(ULTRA), "--limit", "30", "--run", "est", "--json").stdout)
    assert warm["cache_hits"] == 10 and warm["teacher_calls"] == 20
    assert warm["output_tokens"] == 20 * 80, "the fake teacher's 80 output tokens a call, measured"
    assert "measured on 1 earlier run" in warm["basis"] and warm["cost"] is None
    assert warm["minutes"] is not None, "the fleet committed samples in the last hour"
    text = hq("estimate", "--dataset", str(ULTRA), "--limit", "30", "--run", "est").stdout
    assert "20 teacher calls" in text and "HEGELION_PRICE_INPUT_PER_MTOK" in text


def test_status_keeps_tokens_and_cost_of_every_call(hq, workers, redis_server, env):  # noqa: F811
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "6", "--run", "paid")
    workers(1, FAKE_KIMI_FAIL_TIMES="1")  # every prompt fails once (a 429), then answers: 12 calls
    wait_finished(redis_server.client(), "paid", timeout=60)
    st = orjson.loads(hq("status", "--run", "paid", "--json",
                         extra_env={"HEGELION_PRICE_INPUT_PER_MTOK": "1", "HEGELION_PRICE_OUTPUT_PER_MTOK": "10"}).stdout)
    assert st["tokens"] == {"input": 6 * 120, "output": 6 * 80}  # a 429 reports no usage; six answers do
    assert st["cost"] == pytest.approx((6 * 120 * 1 + 6 * 80 * 10) / 1e6)
    assert st["budget"]["calls"]["spent"] == 12
    hq("export", "--run", "paid")
    summary = orjson.loads((Path(env["HEGELION_DATA_DIR"]) / "paid.summary.json").read_bytes())
    assert summary["tokens"] == st["tokens"] and summary["budget"]["calls"]["spent"] == 12
