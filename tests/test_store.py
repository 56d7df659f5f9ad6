"""Exactly-once commit, JSONL flush/repair/export, dead letters and the finished flag, on a real Redis."""

from __future__ import annotations

import asyncio
import multiprocessing

import orjson
import pytest

from hegelion_queue.queue import jsonl, store
from hegelion_queue import keys
from hegelion_queue.queue.connection import connect
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
        a = await jsonl.flush(redis, rk, path)
        b = await jsonl.flush(redis, rk, path)
        for i in range(5, 8):
            await store.commit(redis, rk, f"id{i}", sample(i))
        c = await jsonl.flush(redis, rk, path)
        n = await jsonl.export(redis, rk, tmp_path / "export.jsonl")
        return a.lines, b.lines, c.lines, n.lines

    assert arun(go) == (5, 0, 3, 8)
    assert ids_in(path) == [f"id{i}" for i in range(8)]
    assert path.read_bytes() == (tmp_path / "export.jsonl").read_bytes()


def test_a_line_cut_mid_write_is_repaired_never_duplicated(env, tmp_path):
    path = tmp_path / "out.jsonl"

    async def commit_and_flush(redis, rk, lo, hi):
        for i in range(lo, hi):
            await store.commit(redis, rk, f"id{i}", sample(i))
        return (await jsonl.flush(redis, rk, path)).lines

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
        arun(lambda r, rk: jsonl.flush(r, rk, path))


def _flush_many(path: str, n: int) -> None:
    async def go(redis, rk):
        for _ in range(n):
            await jsonl.flush(redis, rk, __import__("pathlib").Path(path))

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


def test_commit_and_dead_letter_count_a_prompt_once_in_either_form_of_the_enqueued_set(env):
    """The enqueued set keeps digests; a run enqueued before that keeps hex ids. A commit or a dead letter adds
    the prompt only when it is in neither form, so done + dead reaches the count and the run finishes."""
    old, new, last = "a" * 64, "b" * 64, "c" * 64

    async def go(redis, rk):
        await redis.sadd(rk.enqueued, old, bytes.fromhex(new), bytes.fromhex(last))
        await redis.hset(rk.meta, "enqueue_complete", 1)
        await store.commit(redis, rk, old, sample(0))
        await store.commit(redis, rk, new, sample(1))
        before = await redis.exists(rk.finished)
        await store.dead_letter(redis, rk, last, {"reason": "teacher", "record": None})
        return before, await redis.exists(rk.finished), await redis.smembers(rk.enqueued)

    before, finished, members = arun(go)
    assert members == {old.encode(), bytes.fromhex(new), bytes.fromhex(last)}
    assert finished and not before  # 2 done of 3, then 2 done + 1 dead of 3


# ---------------------------------------------------------------- what a prompt and a sample cost in Redis


def test_redis_bytes_per_queued_prompt_and_per_finished_sample(env, redis_server, tmp_path):
    """MEMORY USAGE of what a queued prompt of 400 characters and a finished 5 KB sample keep in Redis (the README's
    scale table measures the same at 1 M in `make bench BENCH_ARGS=--scale`)."""
    from hegelion_queue.queue import codec
    from hegelion_queue.jobs import producer
    from hegelion_queue.sources.read import Prompt, prompt_id

    from .english import English

    n, english = 3000, English(seed=1, pool=20_000)
    texts = [english.text(400) for _ in range(n)]
    prompts = [Prompt(t, prompt_id(t), i) for i, t in enumerate(texts)]
    r = redis_server.client()
    s = get_settings()

    def per_item(*key_names: str) -> float:
        return sum(r.memory_usage(k, samples=0) or 0 for k in key_names) / n

    async def go(redis, rk):
        await producer.enqueue_prompts(redis, s, RUN, prompts, {"dataset": "datasets/openhermes.parquet",
                                                                "split": "train"})
        jobs = [keys.arq_job(keys.job_id(RUN, p.prompt_id)) for p in prompts]
        queued = sum(r.memory_usage(j, samples=0) for j in jobs) / n + per_item(s.queue_name, rk.enqueued)
        c = await codec.for_run(redis, rk)
        assert c.dict_id  # 3,000 prompts: the run has a dictionary of its own
        samples = []
        for p in prompts:  # what a worker does: take the job, count the attempt, commit; arq deletes the job
            await redis.zrem(s.queue_name, keys.job_id(RUN, p.prompt_id))
            await redis.delete(keys.arq_job(keys.job_id(RUN, p.prompt_id)))
            await store.begin_attempt(redis, rk, p.prompt_id, "t" * 32)
            samples.append(english.sample(p.text, p.prompt_id, RUN, p.row, 2100))
            assert (await store.commit(redis, rk, p.prompt_id, samples[-1]))[0]
        finished = per_item(rk.results, rk.done, rk.enqueued, rk.attempts, rk.attempt_tokens)
        await jsonl.export(redis, rk, tmp_path / "out.jsonl")
        return queued, finished, samples

    queued, finished, samples = arun(go)
    sample_bytes = sum(len(orjson.dumps(x)) for x in samples) / n
    lines = [orjson.loads(line) for line in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    for line in lines:
        line["hegelion_trace"].pop("stream_id")
    assert lines == samples  # packed and read back exactly
    print(f"queued prompt {queued:.0f} B; finished sample of {sample_bytes:.0f} B JSON: {finished:.0f} B")
    assert 5000 <= sample_bytes <= 5500
    assert queued <= 600
    assert finished <= 1500


def test_a_run_written_before_packing_still_exports_tails_and_lists_its_letters(env, tmp_path):
    """Entries and letters stored as plain JSON (before samples were packed) read back as before, next to packed
    ones in the same run."""
    old = sample(0)

    async def go(redis, rk):
        old_id = (await redis.xadd(rk.results, {"s": orjson.dumps(old)})).decode()
        await redis.hset(rk.dead, "old", orjson.dumps({"reason": "teacher", "record": None, "time": 1.0}))
        await store.commit(redis, rk, "id1", sample(1))
        await store.dead_letter(redis, rk, "new", {"reason": "config", "record": None})
        n = (await jsonl.export(redis, rk, tmp_path / "out.jsonl")).lines
        return old_id, n, await store.newest(redis, rk, 5), await store.dead_letters(redis, rk)

    old_id, n, newest, letters = arun(go)
    lines = (tmp_path / "out.jsonl").read_bytes().splitlines()
    assert n == 2 and lines[0] == orjson.dumps({**old, "hegelion_trace": {**old["hegelion_trace"],
                                                                            "stream_id": old_id}})
    assert [s["instruction"] for _, s in newest] == ["p0", "p1"]
    assert sorted(x["prompt_id"] for x in letters) == ["new", "old"]


def test_a_re_sent_begin_after_the_breaker_opened_keeps_its_attempt(env):
    """The reply to a begin was lost and redis-py sends it again after another worker opened the breaker: the
    attempt it counted is returned again, not -1 (which would never be refunded)."""
    async def go(redis, rk):
        first = await store.begin_attempt(redis, rk, "p", "t1")
        await redis.hset(rk.breaker, mapping={"reason": "another worker paused the run"})
        again = await store.begin_attempt(redis, rk, "p", "t1")
        fresh = await store.begin_attempt(redis, rk, "p", "t2")
        return first, again, fresh, await redis.hget(rk.attempts, "p")

    assert arun(go) == (1, 1, -1, b"1")


def test_a_re_sent_revive_changes_nothing(env):
    """retry-failed's revive, sent twice (a lost reply): the second finds the job queued and the letter gone."""
    from hegelion_queue.jobs import producer
    from hegelion_queue.settings import get_settings

    s = get_settings()
    pid = "a" * 64
    record = {"prompt_id": pid, "run": RUN, "prompt": "p"}

    async def go(redis, rk):
        await store.dead_letter(redis, rk, pid, {"reason": "teacher", "record": record})
        once = await producer.enqueue_records(redis, s, RUN, [record], revive=True)
        twice = await producer.enqueue_records(redis, s, RUN, [record], revive=True)
        return once.enqueued, twice.enqueued, twice.already_queued, await redis.hlen(rk.dead), \
            await redis.zcard(s.queue_name)

    assert arun(go) == (1, 0, 1, 0, 1)
