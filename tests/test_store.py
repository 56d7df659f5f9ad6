"""Exactly-once commit, JSONL flush/repair/export, dead letters and the finished flag, on a real Redis."""

from __future__ import annotations

import asyncio
import multiprocessing

import orjson
import pytest

from hegelion_queue import keys, store
from hegelion_queue.connection import connect
from hegelion_queue.settings import get_settings

RUN = "storetest"


def sample(i: int) -> dict:
    return {"instruction": f"p{i}", "input": "", "output": "o", "system": "s",
            "hegelion_trace": {"prompt_id": f"id{i}", "run": RUN}}


def arun(fn):
    async def main():
        redis = await connect(get_settings())
        try:
            return await fn(redis, keys.RunKeys("hegelion", RUN))
        finally:
            await redis.aclose()

    return asyncio.run(main())


def ids_in(path) -> list[str]:
    return [orjson.loads(line)["hegelion_trace"]["prompt_id"] for line in path.read_bytes().splitlines()]


def test_commit_is_exactly_once_under_concurrency(env):
    async def go(redis, rk):
        results = await asyncio.gather(*(store.commit(redis, rk, "id1", sample(1)) for _ in range(20)))
        return results, await redis.xlen(rk.results), await redis.scard(rk.done)

    results, xlen, done = arun(go)
    assert sum(committed for committed, _, _ in results) == 1
    assert xlen == 1 and done == 1


def test_flush_appends_only_new_entries_and_export_matches(env, tmp_path):
    path = tmp_path / "out.jsonl"

    async def go(redis, rk):
        for i in range(5):
            await store.commit(redis, rk, f"id{i}", sample(i))
        a = await store.flush(redis, rk, path)
        b = await store.flush(redis, rk, path)
        for i in range(5, 8):
            await store.commit(redis, rk, f"id{i}", sample(i))
        c = await store.flush(redis, rk, path)
        n = await store.export(redis, rk, tmp_path / "export.jsonl")
        return a, b, c, n

    assert arun(go) == (5, 0, 3, 8)
    assert ids_in(path) == [f"id{i}" for i in range(8)]
    assert path.read_bytes() == (tmp_path / "export.jsonl").read_bytes()


def test_a_line_cut_mid_write_is_repaired_never_duplicated(env, tmp_path):
    path = tmp_path / "out.jsonl"

    async def commit_and_flush(redis, rk, lo, hi):
        for i in range(lo, hi):
            await store.commit(redis, rk, f"id{i}", sample(i))
        return await store.flush(redis, rk, path)

    arun(lambda r, rk: commit_and_flush(r, rk, 0, 4))
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3]) + lines[3][:25])  # crash while writing the 4th line
    assert arun(lambda r, rk: commit_and_flush(r, rk, 4, 6)) == 3  # the cut line again, then 2 new
    assert ids_in(path) == [f"id{i}" for i in range(6)]
    path.write_bytes(path.read_bytes()[:10])  # cut inside the very first line
    arun(lambda r, rk: commit_and_flush(r, rk, 6, 6))
    assert ids_in(path) == [f"id{i}" for i in range(6)]


def test_foreign_last_line_is_a_clear_error(env, tmp_path):
    from hegelion_queue.errors import HegelionError

    path = tmp_path / "out.jsonl"
    path.write_text('{"not": "ours"}\n')
    with pytest.raises(HegelionError, match="export"):
        arun(lambda r, rk: store.flush(r, rk, path))


def _flush_many(path: str, n: int) -> None:
    async def go(redis, rk):
        for _ in range(n):
            await store.flush(redis, rk, __import__("pathlib").Path(path))

    arun(go)


def test_flushes_from_several_processes_never_duplicate(env, tmp_path):
    path = tmp_path / "shared.jsonl"

    async def commit_all(redis, rk):
        for i in range(300):
            await store.commit(redis, rk, f"id{i}", sample(i))

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_flush_many, args=(str(path), 30)) for _ in range(3)]
    for p in procs:
        p.start()
    arun(commit_all)
    for p in procs:
        p.join(60)
    _flush_many(str(path), 1)
    ids = ids_in(path)
    assert len(ids) == len(set(ids)) == 300


def test_dead_letter_and_finished_flag(env):
    async def go(redis, rk):
        await redis.sadd(rk.enqueued, "a", "b")
        await redis.hset(rk.meta, "enqueue_complete", 1)
        first = await store.commit(redis, rk, "a", sample(0))
        written, finished = await store.dead_letter(redis, rk, "b", {"reason": "teacher", "record": None})
        again = await store.dead_letter(redis, rk, "a", {"reason": "teacher", "record": None})  # a is done
        once_more = await store.mark_finished_if_complete(redis, rk)
        return first, written, finished, again, once_more, await redis.hlen(rk.dead)

    first, written, finished, again, once_more, dead = arun(go)
    assert first[0] and not first[2]  # committed, not yet finished
    assert written and finished  # the last prompt finishes the run
    assert again == (False, False)  # a done prompt is never dead-lettered
    assert once_more is False  # finished is reported exactly once
    assert dead == 1
