"""The producer: one arq job per prompt, written in batches by a Lua script that keeps arq's own checks.

The script writes exactly what `ArqRedis.enqueue_job` writes (`arq:job:<id>` with a TTL + a ZADD to the
queue) and refuses an id that is queued, running or has a kept result, so stock arq workers run the jobs.
It also skips prompts the run already finished or dead-lettered: running the same command twice adds
nothing, and no paid call is made twice for one prompt.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import orjson
from arq.connections import ArqRedis

from . import keys
from .connection import job_expires_ms
from .prompts import Prompt
from .settings import Settings
from .store import mark_finished_if_complete

logger = logging.getLogger("hegelion.producer")

BATCH = 2000
RUN_KEYS = 6  # KEYS[1..6] below; then two keys per job

# revive = 1 (retry-failed): a dead-lettered prompt gets a fresh start, atomically with its new job.
ENQUEUE_LUA = """
local queue, done, enqueued, dead, finished, attempts = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local expires_ms, score, revive = ARGV[1], ARGV[2], ARGV[3]
local added, already_done, already_queued, already_dead = 0, 0, 0, 0
local n = (#ARGV - 3) / 3
for i = 1, n do
  local jid, pid, payload = ARGV[1 + 3 * i], ARGV[2 + 3 * i], ARGV[3 + 3 * i]
  local job_key, result_key = KEYS[RUN_KEYS + 2 * i - 1], KEYS[RUN_KEYS + 2 * i]
  if revive == '1' and redis.call('SISMEMBER', done, pid) == 0 and redis.call('EXISTS', job_key) == 0 then
    redis.call('HDEL', dead, pid)
    redis.call('HDEL', attempts, pid)
  end
  if redis.call('SISMEMBER', done, pid) == 1 then
    already_done = already_done + 1
  elseif redis.call('EXISTS', job_key, result_key) > 0 then
    already_queued = already_queued + 1
  elseif redis.call('HEXISTS', dead, pid) == 1 then
    already_dead = already_dead + 1
  else
    redis.call('PSETEX', job_key, expires_ms, payload)
    redis.call('ZADD', queue, score, jid)
    redis.call('SADD', enqueued, pid)
    added = added + 1
  end
end
if added > 0 then redis.call('DEL', finished) end
return {added, already_done, already_queued, already_dead}
""".replace("RUN_KEYS", str(RUN_KEYS))


@dataclass
class EnqueueSummary:
    run: str
    sampled: int = 0
    enqueued: int = 0
    already_done: int = 0
    already_queued: int = 0
    already_dead: int = 0
    seconds: float = 0.0

    def add(self, counts: list[int]) -> None:
        self.enqueued += counts[0]
        self.already_done += counts[1]
        self.already_queued += counts[2]
        self.already_dead += counts[3]


def job_payload(record: dict[str, Any], now_ms: int) -> bytes:
    """Exactly arq's `serialize_job` layout, serialised with orjson."""
    return orjson.dumps({"t": None, "f": keys.GENERATE_FUNCTION, "a": [record], "k": {}, "et": now_ms})


def prompt_record(run: str, p: Prompt, dataset: str, split: str) -> dict[str, Any]:
    return {
        "run": run,
        "prompt": p.text,
        "prompt_id": p.prompt_id,
        "source": {"dataset": dataset, "split": split, "row": p.row},
    }


async def enqueue_records(
    redis: ArqRedis,
    settings: Settings,
    run: str,
    records: list[dict[str, Any]],
    progress: Callable[[int], None] | None = None,
    revive: bool = False,
) -> EnqueueSummary:
    """Enqueue prompt records (see `prompt_record`) for `run`, BATCH per Lua call."""
    rk = keys.RunKeys(settings.key_prefix, run)
    script = redis.register_script(ENQUEUE_LUA)
    summary = EnqueueSummary(run=run, sampled=len(records))
    expires = job_expires_ms(settings)
    for start in range(0, len(records), BATCH):
        batch = records[start : start + BATCH]
        now = int(time.time() * 1000)
        job_keys: list[str] = []
        args: list[Any] = [expires, now, int(revive)]
        for rec in batch:
            jid = keys.job_id(run, rec["prompt_id"])
            job_keys += [keys.arq_job(jid), keys.arq_result(jid)]
            args += [jid, rec["prompt_id"], job_payload(rec, now)]
        run_keys = [settings.queue_name, rk.done, rk.enqueued, rk.dead, rk.finished, rk.attempts]
        summary.add(await script(keys=run_keys + job_keys, args=args))
        if progress:
            progress(len(batch))
    return summary


async def enqueue_prompts(
    redis: ArqRedis,
    settings: Settings,
    run: str,
    prompts: list[Prompt],
    meta: dict[str, Any],
    progress: Callable[[int], None] | None = None,
) -> EnqueueSummary:
    """Record the run's metadata, enqueue its prompts, then mark the enqueue complete."""
    t0 = time.perf_counter()
    rk = keys.RunKeys(settings.key_prefix, run)
    dataset, split = str(meta.get("dataset", "")), str(meta.get("split", ""))
    now = time.time()
    await redis.sadd(keys.runs_index(settings.key_prefix), run)
    await redis.hsetnx(rk.meta, "created_at", now)
    await redis.hset(
        rk.meta,
        mapping={**{k: _meta_value(v) for k, v in meta.items()}, "updated_at": now, "enqueue_complete": 0},
    )
    records = [prompt_record(run, p, dataset, split) for p in prompts]
    summary = await enqueue_records(redis, settings, run, records, progress)
    summary.seconds = time.perf_counter() - t0
    await redis.hset(rk.meta, mapping={"enqueue_complete": 1, "last_enqueue": orjson.dumps(asdict(summary))})
    await mark_finished_if_complete(redis, rk)
    return summary


def _meta_value(v: Any) -> Any:
    return "" if v is None else (orjson.dumps(v) if isinstance(v, (dict, list)) else v)


async def retry_failed(redis: ArqRedis, settings: Settings, run: str) -> EnqueueSummary:
    """Re-enqueue every dead-lettered prompt of `run` with a fresh attempt count."""
    rk = keys.RunKeys(settings.key_prefix, run)
    letters = await redis.hgetall(rk.dead)
    records = [orjson.loads(v)["record"] for v in letters.values()]
    return await enqueue_records(redis, settings, run, records, revive=True)
