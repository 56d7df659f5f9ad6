"""Baseline for the per-job overhead figure: stock arq, orjson, each job spawning `true`, same slots.

    python -m bench.raw_arq enqueue N          then   arq bench.raw_arq.WorkerSettings
"""

import asyncio
import os
import sys
import time

import orjson
from arq.connections import RedisSettings, create_pool

QUEUE = "bench:raw"
REDIS = RedisSettings.from_dsn(os.environ.get("HEGELION_REDIS_URL", "redis://127.0.0.1:6379/0"))


async def spawn_true(ctx):
    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()
    async with ctx["redis"].pipeline(transaction=False) as p:
        p.incr("bench:raw:done").set("bench:raw:last", time.time())
        await p.execute()


class WorkerSettings:
    functions = [spawn_true]
    queue_name = QUEUE
    redis_settings = REDIS
    max_jobs = int(os.environ.get("BENCH_MAX_JOBS", "32"))
    poll_delay = float(os.environ.get("HEGELION_POLL_DELAY", "0.05"))
    keep_result = 0
    job_serializer = orjson.dumps
    job_deserializer = orjson.loads


async def enqueue(n: int) -> None:
    redis = await create_pool(REDIS, job_serializer=orjson.dumps, job_deserializer=orjson.loads,
                              default_queue_name=QUEUE)
    for i in range(n):
        await redis.enqueue_job("spawn_true", _job_id=f"raw:{i}")
    await redis.aclose()


if __name__ == "__main__" and sys.argv[1] == "enqueue":
    asyncio.run(enqueue(int(sys.argv[2])))
