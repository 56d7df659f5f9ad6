"""status.py against a real Redis: dead letters counted by reason inside Redis, one snapshot for many runs."""

from __future__ import annotations

import asyncio

import orjson

from hegelion_queue.queue import status
from hegelion_queue.queue.connection import connect
from hegelion_queue.keys import RunKeys
from hegelion_queue.settings import get_settings


def run(coro_fn):
    async def main():
        redis = await connect(get_settings())
        try:
            return await coro_fn(redis)
        finally:
            await redis.aclose()

    return asyncio.run(main())


def test_dead_letters_are_counted_by_their_own_reason_whatever_the_raw_output_says(redis_server, env):
    r = redis_server.client()
    letters = {
        "a": {"record": {"prompt": "p", "reason": "nested, not ours"}, "raw_output": 'says "reason":"fake" x',
              "reason": "invalid_answer", "time": 1},
        "b": {"reason": "bad_payload", "error": "not JSON", "raw_output": '{"reason":"x"}' * 1000, "record": None},
        "c": {"record": None, "raw_output": "\\" * 3 + '"', "reason": "teacher"},
        "d": {"reason": 'odd "quoted" reason'},
        "e": {"reason": 7},
    }
    for pid, letter in letters.items():
        r.hset("hegelion:run:x:dead", pid, orjson.dumps(letter))
    r.hset("hegelion:run:x:dead", "f", b"not json at all")
    got = run(lambda redis: status.collect(redis, get_settings(), RunKeys("hegelion", "x")))
    assert got["dead_by_reason"] == {"invalid_answer": 1, "bad_payload": 1, "teacher": 1,
                                     'odd "quoted" reason': 1, "?": 2}
    assert got["dead"] == 6


def test_the_reason_index_follows_letters_written_committed_and_revived(redis_server, env):
    from hegelion_queue.queue import store
    from hegelion_queue.jobs.producer import retry_failed

    s = get_settings()
    rk = RunKeys("hegelion", "idx")
    record = {"prompt_id": "a" * 64, "run": "idx", "prompt": "p"}

    async def go(redis):
        for pid, reason in (("a" * 64, "teacher"), ("b" * 64, "invalid_answer"), ("c" * 64, "invalid_answer")):
            await store.dead_letter(redis, rk, pid, {"reason": reason, "record": {**record, "prompt_id": pid}})
        first = (await status.collect(redis, s, rk))["dead_by_reason"]
        await store.commit(redis, rk, "b" * 64, {"instruction": "p", "hegelion_trace": {}})  # a late success
        second = (await status.collect(redis, s, rk))["dead_by_reason"]
        await retry_failed(redis, s, "idx", reason="teacher")
        third = (await status.collect(redis, s, rk))["dead_by_reason"]
        return first, second, third, await redis.hgetall(rk.dead_reasons)

    first, second, third, index = run(go)
    assert first == {"teacher": 1, "invalid_answer": 2}
    assert second == {"teacher": 1, "invalid_answer": 1}
    assert third == {"invalid_answer": 1} and index == {b"c" * 64: b"invalid_answer"}


def test_status_counts_dead_letters_without_reading_them(redis_server, env):
    """O(1) in the run's size: the per-reason counts answer, not the letters (here made unreadable)."""
    from hegelion_queue.queue import store

    s = get_settings()
    rk = RunKeys("hegelion", "o1")

    async def go(redis):
        for i in range(30):
            await store.dead_letter(redis, rk, f"{i:064x}", {"reason": ("teacher", "config")[i % 2], "record": None})
        await store.commit(redis, rk, f"{0:064x}", {"instruction": "p", "hegelion_trace": {"x": 1}})
        for pid in await redis.hkeys(rk.dead):
            await redis.hset(rk.dead, pid, b"unreadable")
        return (await status.collect(redis, s, rk))["dead_by_reason"], await redis.hgetall(rk.dead_counts)

    by_reason, counts = run(go)
    assert by_reason == {"teacher": 14, "config": 15}
    assert counts == {b"teacher": b"14", b"config": b"15"}


def test_collect_many_equals_collect_run_by_run(redis_server, env, hq):
    from .conftest import ULTRA

    for name, n in (("one", 3), ("two", 5)):
        hq("enqueue", "--dataset", str(ULTRA), "--limit", str(n), "--run", name)
    r = redis_server.client()
    r.hset("hegelion:run:two:stats", mapping={"retries": 4, "teacher_seconds": 2.5, "usage_output": 160})
    r.sadd("hegelion:runs", "not a run name")  # passed over, not an error
    s = get_settings()

    async def both(redis):
        fleet = await status.fleet(redis, s)
        singles = [await status.collect(redis, s, RunKeys("hegelion", n)) for n in ("one", "two")]
        return fleet, singles

    fleet, singles = run(both)
    assert [x["run"] for x in fleet["runs"]] == ["one", "two"]
    assert fleet["runs"] == singles
    assert fleet["queues"][0] == {"name": "hegelion:queue", "total": 8, "due": 8, "deferred": 0}
    assert singles[1]["retries"] == 4 and singles[1]["usage"] == {"output": 160.0}


def test_packed_letters_from_before_the_counts_are_indexed_once_then_counted_from_the_index(redis_server, env):
    """Letters packed as zstd frames, written before the reason index and the counts: the scan inside Redis counted
    them as `?`; now `collect` indexes them once, and every later call reads the counts alone."""
    from hegelion_queue.queue.codec import PLAIN

    r = redis_server.client()
    for i, reason in enumerate(["teacher", "teacher", "invalid_answer", "config"]):
        r.hset("hegelion:run:packed:dead", f"p{i}", PLAIN.pack({"reason": reason, "record": None,
                                                                "raw_output": "x" * 5000}))

    def hscans() -> int:
        return int(r.info("commandstats").get("cmdstat_hscan", {}).get("calls", 0))

    first = run(lambda redis: status.collect(redis, get_settings(), RunKeys("hegelion", "packed")))
    assert first["dead_by_reason"] == {"teacher": 2, "invalid_answer": 1, "config": 1} and first["dead"] == 4
    assert r.hgetall("hegelion:run:packed:dead_counts") == {b"teacher": b"2", b"invalid_answer": b"1", b"config": b"1"}
    before = hscans()
    again = run(lambda redis: status.collect(redis, get_settings(), RunKeys("hegelion", "packed")))
    assert again["dead_by_reason"] == first["dead_by_reason"] and hscans() == before, "the letters were read again"
