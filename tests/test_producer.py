"""The producer against a real Redis: arq-compatible jobs, idempotence, done prompts, errors."""

from __future__ import annotations

import asyncio

import orjson

from hegelion_queue.queue import codec, store
from hegelion_queue import keys
from hegelion_queue.queue.connection import connect, load_job
from hegelion_queue.sources.sample import load_prompts
from hegelion_queue.settings import get_settings

from .conftest import ULTRA


def enqueue_json(hq, *args):
    out = hq("enqueue", "--dataset", str(ULTRA), "--json", *args).stdout
    return orjson.loads(out)


def test_enqueue_puts_one_orjson_job_per_prompt_and_twice_adds_nothing(hq, redis_server):
    first = enqueue_json(hq, "--limit", "10", "--run", "r1")
    assert (first["enqueued"], first["sampled"], first["already_queued"]) == (10, 10, 0)
    assert {"run", "sampled", "enqueued", "already_done", "already_queued", "skipped_empty", "skipped_too_long",
            "duplicates"} <= first.keys()
    r = redis_server.client()
    assert r.zcard("hegelion:queue") == 10
    jid = r.zrange("hegelion:queue", 0, 0)[0].decode()
    job = load_job(r.get(f"arq:job:{jid}"))  # a zstd frame of JSON, not pickle, read by the workers' deserializer
    assert job["f"] == "generate" and job["t"] is None and job["k"] == {}
    record = codec.PLAIN.unpack(job["a"][0]["packed"])  # 10 prompts: too few for a dictionary
    assert not r.exists("hegelion:run:r1:zdict")
    assert jid.startswith("r1:") and record["run"] == "r1" and record["prompt"]
    assert record["source"]["dataset"] == str(ULTRA) and record["source"]["split"] == "train_prefs"
    assert r.ttl(f"arq:job:{jid}") == -1  # never expires: arq would drop it without a word (issue #13, hole 10)
    second = enqueue_json(hq, "--limit", "10", "--run", "r1")
    assert (second["enqueued"], second["already_queued"]) == (0, 10)
    assert r.zcard("hegelion:queue") == 10
    meta = r.hgetall("hegelion:run:r1:meta")
    assert meta[b"enqueue_complete"] == b"1" and meta[b"seed"] == b"42" and meta[b"limit"] == b"10"


def test_stock_arq_refuses_an_id_our_producer_queued(env):
    async def go():
        s = get_settings()
        redis = await connect(s)
        prompts, _ = load_prompts(str(ULTRA), "train_prefs", limit=1)
        from hegelion_queue.jobs.producer import enqueue_prompts

        await enqueue_prompts(redis, s, "r2", prompts, {})
        jid = keys.job_id("r2", prompts[0].prompt_id)
        job = await redis.enqueue_job("generate", {}, _job_id=jid)
        queued = await redis.queued_jobs(queue_name=s.queue_name)  # arq reads our job back
        await redis.aclose()
        return job, queued

    job, queued = asyncio.run(go())
    assert job is None
    assert len(queued) == 1 and queued[0].function == "generate"
    assert codec.PLAIN.unpack(queued[0].args[0]["packed"])["run"] == "r2"


def test_done_prompts_are_not_enqueued_again(hq, redis_server):
    first = enqueue_json(hq, "--limit", "5", "--run", "r3")
    r = redis_server.client()
    ids = [j.decode().split(":", 1)[1] for j in r.zrange("hegelion:queue", 0, -1)]
    r.delete("hegelion:queue", *[f"arq:job:r3:{i}" for i in ids])  # as if the workers finished them
    r.sadd("hegelion:run:r3:done", *ids[:3])
    again = enqueue_json(hq, "--limit", "5", "--run", "r3")
    assert (first["enqueued"], again["already_done"], again["enqueued"]) == (5, 3, 2)


def test_enqueued_set_keeps_digests_and_an_old_runs_hex_members_count_once(hq, redis_server):
    """The set that counts a run's prompts holds 32-byte digests; a run enqueued before that holds hex, and its
    revived prompts must not be counted a second time (done + dead would never reach the count: no training)."""
    enqueue_json(hq, "--limit", "4", "--run", "r4")
    r = redis_server.client()
    members = r.smembers("hegelion:run:r4:enqueued")
    ids = [j.decode().split(":", 1)[1] for j in r.zrange("hegelion:queue", 0, -1)]
    assert {m.hex() for m in members} == set(ids) and all(len(m) == 32 for m in members)
    r.delete("hegelion:run:r4:enqueued", "hegelion:queue", *[f"arq:job:r4:{i}" for i in ids])
    r.sadd("hegelion:run:r4:enqueued", *ids)  # as written before: hex; the jobs have ended as dead letters
    rk = keys.RunKeys("hegelion", "r4")
    prompts = {p.prompt_id: p for p in load_prompts(str(ULTRA), "train_prefs", limit=4)[0]}

    async def dead() -> None:
        redis = await connect(get_settings())
        for pid in ids:
            record = {"prompt_id": pid, "run": "r4", "prompt": prompts[pid].text, "source": {"row": prompts[pid].row}}
            await store.dead_letter(redis, rk, pid, {"record": record, "attempts": 5, "reason": "teacher"})
        await redis.aclose()

    asyncio.run(dead())
    assert "re-enqueued 4" in hq("retry-failed", "--run", "r4").stdout
    assert r.zcard("hegelion:queue") == 4 and r.scard("hegelion:run:r4:enqueued") == 4
    assert store.enqueued_ids_sync(r, rk) == set(ids)


def test_runs_are_independent(hq):
    assert enqueue_json(hq, "--limit", "4", "--run", "a")["enqueued"] == 4
    assert enqueue_json(hq, "--limit", "4", "--run", "b")["enqueued"] == 4


def test_unreachable_redis_is_one_line_naming_the_url(hq):
    p = hq("enqueue", "--dataset", str(ULTRA), "--limit", "3", check=False,
           extra_env={"HEGELION_REDIS_URL": "redis://:sekret@127.0.0.1:1/0"})
    assert p.returncode == 1
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in p.stderr
    assert "sekret" not in p.stderr and "Traceback" not in p.stderr


def test_bad_redis_url_and_bad_dataset_are_clear_errors(hq):
    p = hq("enqueue", "--dataset", str(ULTRA), check=False, extra_env={"HEGELION_REDIS_URL": "http://x"})
    assert p.returncode == 1 and "is not a Redis URL" in p.stderr and "Traceback" not in p.stderr
    p = hq("enqueue", "--dataset", "./missing.parquet", check=False)
    assert p.returncode == 1 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_prompts_file_and_summary_line(hq):
    from .conftest import FIXTURES

    p = hq("enqueue", "--prompts-file", str(FIXTURES / "prompts.txt"), "--run", "txt")
    assert "enqueued 12" in p.stdout
