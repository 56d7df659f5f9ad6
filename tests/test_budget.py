"""The spending budget: checked in the script that counts each attempt, on a real Redis; several real worker
processes stop at it (the fake teacher's log counts the calls), status, resume and bad input."""

from __future__ import annotations

import time

import orjson
import pytest

from hegelion_queue.queue import budget, store
from hegelion_queue import keys

from .conftest import ULTRA, wait_for
from .test_dashboard import serve  # noqa: F401  (fixture)
from .test_generator_e2e import teacher_calls, workers  # noqa: F401
from .test_store import arun

RUN = "storetest"


def test_begin_counts_calls_and_pauses_at_each_limit(env):
    async def go(redis, rk):
        await budget.set_limits(redis, rk, {"calls": 3})
        got = [await store.begin_attempt(redis, rk, f"p{i}", f"t{i}") for i in range(5)]
        return got, await redis.hgetall(rk.breaker), await redis.hget(rk.stats, "teacher_calls")

    got, breaker, calls = arun(go)
    assert got == [1, 1, 1, -1, -1] and calls == b"3"  # the 4th call never starts: a calls budget is exact
    assert breaker[b"reason"] == b"budget" and breaker[b"budget"] == b"calls"


@pytest.mark.parametrize("usage,limit,starts", [
    ({"input_other": 120, "output": 80}, 400, False),  # 200 spent of 400: under
    ({"input_other": 300, "output": 100}, 400, True),  # 400 of 400: reached
    ({"prompt_tokens": 150, "completion_tokens": 50, "total_tokens": 200}, 400, False),  # a total is not added twice
])
def test_token_budget_is_checked_against_what_was_spent(env, usage, limit, starts):
    async def go(redis, rk):
        await budget.set_limits(redis, rk, {"tokens": limit})
        assert await store.begin_attempt(redis, rk, "a", "t1") == 1
        await store.commit(redis, rk, "a", {"hegelion_trace": {}}, 1.0, usage)
        return await store.begin_attempt(redis, rk, "b", "t2"), await budget.read(redis, rk)

    attempt, view = arun(go)
    assert (attempt == -1) == starts
    assert view["tokens"]["spent"] == budget.tokens_of(usage) and view["calls"]["spent"] == 1 + (not starts)


def test_a_resent_begin_is_not_a_second_call(env):
    async def go(redis, rk):
        await budget.set_limits(redis, rk, {"calls": 1})
        return [await store.begin_attempt(redis, rk, "a", "same") for _ in range(3)]

    assert arun(go) == [1, 1, 1]


def test_parse_limit_refuses_zero_negative_and_text():
    assert budget.parse_limit("tokens", "1000") == 1000 and budget.parse_limit("teacher_seconds", "2.5") == 2.5
    for raw in ("0", "-5", "abc", "1.5", "nan", "inf", ""):
        with pytest.raises(Exception, match="--budget-tokens takes a positive whole number"):
            budget.parse_limit("tokens", raw)


@pytest.mark.parametrize("args,env_extra,says", [
    (["--budget-tokens", "0"], {}, "--budget-tokens takes a positive whole number, not '0'"),
    (["--budget-calls", "-3"], {}, "--budget-calls takes a positive whole number, not '-3'"),
    (["--budget-teacher-seconds", "soon"], {}, "--budget-teacher-seconds takes a positive number of seconds"),
    ([], {"HEGELION_BUDGET_TOKENS": "0"}, "HEGELION_BUDGET_TOKENS='0': Input should be greater than 0"),
    ([], {"HEGELION_BUDGET_CALLS": "lots"}, "HEGELION_BUDGET_CALLS='lots'"),
])
def test_bad_budget_is_one_line_and_writes_nothing(hq, redis_server, args, env_extra, says):
    p = hq("enqueue", "--dataset", str(ULTRA), "--limit", "3", "--run", "bad", *args, check=False, extra_env=env_extra)
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and says in p.stderr, p.stderr
    assert redis_server.client().keys("*") == []


@pytest.mark.e2e
def test_e2e_token_budget_stops_three_workers_and_resume_raises_it(hq, workers, serve, redis_server, env):  # noqa: F811
    """3 worker processes x 4 slots, each fake-kimi call reports 200 tokens: with a budget of 1,000 a call starts only
    while fewer than 5 samples are committed, so at most 4 + 12 in flight calls ever start, never all 60."""
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "60", "--run", "money", "--budget-tokens", "1000")
    group = workers(3, FAKE_KIMI_DELAY="0.3", HEGELION_MAX_JOBS="4", HEGELION_BREAKER_RECHECK="0.5")
    r = redis_server.client()
    wait_for(lambda: r.exists("hegelion:run:money:breaker"), 60, "paused")
    time.sleep(2)  # every call in flight ends; a worker that ignored the pause would start more
    calls = teacher_calls(env)
    done = r.scard("hegelion:run:money:done")
    assert r.hget("hegelion:run:money:breaker", "reason") == b"budget"
    assert 5 <= done == len(calls) <= 4 + 3 * 4, f"{len(calls)} calls, {done} done"
    assert int(r.hget("hegelion:run:money:stats", "teacher_calls")) == len(calls)
    time.sleep(1.5)
    assert len(teacher_calls(env)) == len(calls), "a call started after the budget was spent"
    assert group.alive() == 3

    st = orjson.loads(hq("status", "--run", "money", "--json").stdout)
    assert st["budget"]["tokens"] == {"limit": 1000, "spent": 200 * done, "left": 0}
    assert st["budget"]["calls"] == {"limit": None, "spent": done, "left": None}
    text = hq("status", "--run", "money").stdout
    assert f"budget: tokens {200 * done:,} of 1,000 spent, 0 left" in text
    assert "PAUSED: budget" in text and "--budget-tokens N" in text

    server = serve()
    m = server.metrics()
    assert m[("hegelion_budget_limit", (("kind", "tokens"), ("run", "money")))] == 1000
    assert m[("hegelion_budget_spent", (("kind", "tokens"), ("run", "money")))] == 200 * done
    assert m[("hegelion_budget_spent", (("kind", "calls"), ("run", "money")))] == done
    assert ("hegelion_budget_limit", (("kind", "calls"), ("run", "money"))) not in m
    for page in ("/", "/runs/money"):
        html = server.get(page).decode()
        assert f"tokens <b>{200 * done:,}</b> of 1,000 spent, <b class=\"left\">0</b> left" in html, page
    assert "--budget-tokens N" in server.get("/runs/money").decode()

    refused = hq("resume", "--run", "money", check=False)
    assert refused.returncode == 1 and "has spent its budget (tokens" in refused.stderr
    assert r.exists("hegelion:run:money:breaker")
    hq("resume", "--run", "money", "--budget-tokens", "100000")
    wait_for(lambda: r.exists("hegelion:run:money:finished"), 90, "finished")
    st = orjson.loads(hq("status", "--run", "money", "--json").stdout)
    assert st["done"] == 60 and st["budget"]["tokens"] == {"limit": 100000, "spent": 12000, "left": 88000}
    assert len(teacher_calls(env)) == 60


@pytest.mark.e2e
def test_e2e_calls_budget_is_exact_across_workers(hq, workers, redis_server, env):  # noqa: F811
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "40", "--run", "calls",
       extra_env={"HEGELION_BUDGET_CALLS": "7"})  # the setting, stored with the run by enqueue
    workers(3, FAKE_KIMI_DELAY="0.2", HEGELION_MAX_JOBS="4", HEGELION_BREAKER_RECHECK="0.5")
    r = redis_server.client()
    wait_for(lambda: r.exists("hegelion:run:calls:breaker"), 60, "paused")
    time.sleep(2)
    assert len(teacher_calls(env)) == 7 == r.scard("hegelion:run:calls:done")
    assert r.hgetall(keys.RunKeys("hegelion", "calls").budget) == {b"calls": b"7"}


# ---------------------------------------------------------------- every call that ends spends


def test_a_call_that_ends_without_a_sample_spends_once_per_attempt(env):
    async def go(redis, rk):
        assert await store.begin_attempt(redis, rk, "a", "t1") == 1
        first = await store.spend(redis, rk, "a", "t1", 2.5, {"input_other": 120, "output": 80})
        again = await store.spend(redis, rk, "a", "t1", 2.5, {"input_other": 120, "output": 80})  # a re-send
        return first, again, budget.spent({k.decode(): v.decode() for k, v in (await redis.hgetall(rk.stats)).items()})

    first, again, spent = arun(go)
    assert (first, again) == (True, False)
    assert spent == {"tokens": 200, "calls": 1, "teacher_seconds": 2.5}


@pytest.mark.e2e
def test_e2e_malformed_answers_trip_a_token_budget_within_the_slots_in_flight(hq, workers, redis_server, env):  # noqa: F811
    """A teacher that answers only malformed text (200 tokens a call): the 5,000-token budget stops the run after
    25 calls, plus at most the calls already in flight. Before, failed calls counted nothing: 30 prompts x 5 tries."""
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "30", "--run", "junk", "--budget-tokens", "5000")
    workers(2, FAKE_KIMI_MODE="invalid", FAKE_KIMI_DELAY="0.1", HEGELION_MAX_JOBS="4")
    r = redis_server.client()
    wait_for(lambda: r.exists("hegelion:run:junk:breaker"), 60, "paused")
    time.sleep(1.5)
    calls = len(teacher_calls(env))
    st = orjson.loads(hq("status", "--run", "junk", "--json").stdout)
    assert st["paused"]["reason"] == "budget" and st["done"] == 0
    assert 25 <= calls <= 25 + 2 * 4, calls
    assert st["budget"]["tokens"]["spent"] == 200 * calls


@pytest.mark.e2e
def test_e2e_timeouts_count_toward_a_teacher_seconds_budget(hq, workers, redis_server, env):  # noqa: F811
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "10", "--run", "slow", "--budget-teacher-seconds", "3")
    workers(1, FAKE_KIMI_MODE="hang", HEGELION_TEACHER_TIMEOUT="1", HEGELION_MAX_JOBS="1")
    r = redis_server.client()
    wait_for(lambda: r.exists("hegelion:run:slow:breaker"), 60, "paused by the seconds spent in time-outs")
    spent = orjson.loads(hq("status", "--run", "slow", "--json").stdout)["budget"]["teacher_seconds"]["spent"]
    assert 3 <= spent <= 6


# ---------------------------------------------------------------- a paused run rests


def redis_commands(r) -> int:
    return int(r.info("stats")["total_commands_processed"])


@pytest.mark.e2e
def test_e2e_a_paused_run_makes_redis_do_almost_nothing(hq, workers, redis_server, env, tmp_path):  # noqa: F811
    """2,000 queued prompts of a paused run: each job is picked once and rests until `resume`; before, each was
    picked again every 15 s (~130 no-op jobs a second here)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"Paused prompt {i}: is it worth it?\n" for i in range(2000)))
    hq("enqueue", "--prompts-file", str(prompts), "--run", "held")
    r = redis_server.client()
    r.hset("hegelion:run:held:breaker", mapping={"reason": "test pause", "since": time.time()})
    group = workers(1, HEGELION_MAX_JOBS="32", HEGELION_POLL_DELAY="0.1")
    now_ms = lambda: int(time.time() * 1000)  # noqa: E731
    wait_for(lambda: r.zcount("hegelion:queue", "-inf", now_ms()) == 0, 120, "every job resting")
    before, t0 = redis_commands(r), time.monotonic()
    time.sleep(20)  # longer than the 15 s the jobs of a paused run rested before
    rate = (redis_commands(r) - before) / (time.monotonic() - t0)
    print(f"paused run of 2,000 prompts: {rate:.0f} Redis commands/s")
    assert rate < 60, f"{rate:.0f} commands/s"
    assert len(teacher_calls(env)) == 0
    group.stop()
    hq("resume", "--run", "held")
    assert r.zcount("hegelion:queue", "-inf", now_ms()) == 2000, "resume makes them due at once"
