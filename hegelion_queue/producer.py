"""The producer: one arq job per prompt, written in batches by a Lua script that keeps arq's own checks.

The script writes what `ArqRedis.enqueue_job` writes (`arq:job:<id>` + a ZADD to the queue) and refuses an id
that is queued, running or has a kept result, so stock arq workers run the jobs. The job key has no TTL: arq
drops a job whose key expired without a word, and a paused run or a rate-limited backlog can wait longer than
any TTL (the key goes when the job ends, or with `purge`).
It also skips prompts the run already finished or dead-lettered: running the same command twice adds
nothing, and no paid call is made twice for one prompt.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import orjson
from arq.connections import ArqRedis

from . import budget, keys, provenance
from .errors import HegelionError
from .prompts import Prompt
from .settings import Settings
from .store import dead_letters, mark_finished_if_complete
from .training_job import training

logger = logging.getLogger("hegelion.producer")

BATCH = 2000

# One argument per job: its payload. The payload starts with a fixed prefix followed by the prompt id
# (see job_payload), so the script reads the id at a known offset instead of receiving it separately:
# packing arguments is most of the client's cost. arq's own keys are built here from the job id, as arq
# builds them (arq is not cluster-safe either). Empty done-set / dead hash skip their per-job lookups.
# revive = 1 (retry-failed): a dead-lettered prompt gets a fresh start, atomically with its new job.
ENQUEUE_LUA = """
local queue, done, enqueued, dead, finished, attempts, tokens, dead_reasons = unpack(KEYS)
local score, revive, run, id_at = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local check_done = redis.call('SCARD', done) > 0
local check_dead = redis.call('HLEN', dead) > 0
local added, already_done, already_queued, already_dead = 0, 0, 0, 0
local zadd, sadd = {}, {}
for i = 5, #ARGV do
  local payload = ARGV[i]
  local pid = string.sub(payload, id_at, id_at + 63)
  local jid = run .. ':' .. pid
  local job_key = 'arq:job:' .. jid
  if revive == '1' and redis.call('SISMEMBER', done, pid) == 0 and redis.call('EXISTS', job_key) == 0 then
    redis.call('HDEL', dead, pid)
    redis.call('HDEL', dead_reasons, pid)
    redis.call('HDEL', attempts, pid)
    redis.call('HDEL', tokens, pid)
  end
  if check_done and redis.call('SISMEMBER', done, pid) == 1 then
    already_done = already_done + 1
  elseif redis.call('EXISTS', job_key, 'arq:result:' .. jid) > 0 then
    already_queued = already_queued + 1
  elseif check_dead and redis.call('HEXISTS', dead, pid) == 1 then
    already_dead = already_dead + 1
  else
    redis.call('SET', job_key, payload)
    zadd[#zadd + 1] = score
    zadd[#zadd + 1] = jid
    sadd[#sadd + 1] = pid
    added = added + 1
  end
end
if added > 0 then
  redis.call('ZADD', queue, unpack(zadd))
  redis.call('SADD', enqueued, unpack(sadd))
  redis.call('DEL', finished)
end
return {added, already_done, already_queued, already_dead}
"""


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
    """arq's `serialize_job` layout, serialised with orjson; `prompt_id` comes first in the record."""
    return orjson.dumps({"t": None, "f": keys.GENERATE_FUNCTION, "a": [record], "k": {}, "et": now_ms})


_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
# Where the prompt id starts in every payload (1-based, for Lua): the prefix before it never varies.
PROMPT_ID_AT = job_payload({"prompt_id": "\0"}, 0).index(b"\\u0000") + 1


def prompt_record(run: str, p: Prompt, dataset: str, split: str, config_id: str = "") -> dict[str, Any]:
    record = {
        "prompt_id": p.prompt_id,  # first: ENQUEUE_LUA reads it at PROMPT_ID_AT
        "run": run,
        "prompt": p.text,
        "source": {"dataset": dataset, "split": split, "row": p.row},
    }
    if config_id:  # the run's configuration (provenance.py): the sample made from this job carries it
        record["config_id"] = config_id
    return record


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
    run_keys = [settings.queue_name, rk.done, rk.enqueued, rk.dead, rk.finished, rk.attempts, rk.attempt_tokens,
                rk.dead_reasons]
    pending: asyncio.Future | None = None
    for start in range(0, len(records), BATCH):
        batch = records[start : start + BATCH]
        now = int(time.time() * 1000)
        if not all(_SHA256.match(rec["prompt_id"]) for rec in batch):
            raise ValueError("prompt ids must be sha256 hex digests")
        # {"prompt_id": …, **rec}: the id first even in a record read back from a dead letter
        payloads = (job_payload({"prompt_id": rec["prompt_id"], **rec}, now) for rec in batch)
        args = [now, int(revive), run, PROMPT_ID_AT, *payloads]
        call = asyncio.ensure_future(script(keys=run_keys, args=args))
        if pending is not None:  # build the next batch while Redis runs this one
            summary.add(await pending)
        pending = call
        if progress:
            progress(len(batch))
    if pending is not None:
        summary.add(await pending)
    return summary


async def enqueue_prompts(
    redis: ArqRedis,
    settings: Settings,
    run: str,
    prompts: list[Prompt],
    meta: dict[str, Any],
    progress: Callable[[int], None] | None = None,
    *,
    config: dict[str, Any] | None = None,
    allow_config_change: bool = False,
    limits: dict[str, int | float] | None = None,
    command: str = "",
) -> EnqueueSummary:
    """Record the run's configuration (refused, with nothing written, when it differs from the run's own and no
    change is allowed), budget, command and metadata, enqueue its prompts, then mark the enqueue complete."""
    t0 = time.perf_counter()
    rk = keys.RunKeys(settings.key_prefix, run)
    dataset, split = str(meta.get("dataset", "")), str(meta.get("split", ""))
    cid = await provenance.record(redis, rk, config, allow_config_change) if config is not None else ""
    await budget.set_limits(redis, rk, limits or {})
    await provenance.record_command(redis, rk, command)
    now = time.time()
    await redis.sadd(keys.runs_index(settings.key_prefix), run)
    await redis.hsetnx(rk.meta, "created_at", now)
    await redis.hset(
        rk.meta,
        mapping={**{k: _meta_value(v) for k, v in meta.items()}, "updated_at": now, "enqueue_complete": 0},
    )
    records = [prompt_record(run, p, dataset, split, cid) for p in prompts]
    summary = await enqueue_records(redis, settings, run, records, progress)
    summary.seconds = time.perf_counter() - t0
    # enqueue_complete and the finished check in one script: a producer cut short between them would leave a
    # run whose prompts are all done unfinished, with no training job, forever
    await mark_finished_if_complete(redis, rk, training(settings, run), orjson.dumps(asdict(summary)))
    return summary


def _meta_value(v: Any) -> Any:
    return "" if v is None else (orjson.dumps(v) if isinstance(v, (dict, list)) else v)


async def retry_failed(redis: ArqRedis, settings: Settings, run: str, reason: str | None = None) -> EnqueueSummary:
    """Re-enqueue the dead-lettered prompts of `run` (those with `reason`, or all) with a fresh attempt count.
    A letter without a prompt record (an unreadable payload) has nothing to re-enqueue and stays."""
    rk = keys.RunKeys(settings.key_prefix, run)
    letters = await dead_letters(redis, rk)
    cid = await redis.hget(rk.meta, "config_id")  # made again under the run's configuration of now
    stamp = {"config_id": cid.decode()} if cid else {}
    records = [{**x["record"], **stamp} for x in letters if x.get("record") and reason in (None, x.get("reason"))]
    return await enqueue_records(redis, settings, run, records, revive=True)


async def purge_run(redis: ArqRedis, settings: Settings, run: str) -> tuple[int, int]:
    """Delete one run's keys, its queued jobs and its training job (so the same run name starts afresh and is
    trained again); (keys deleted, jobs removed). Never another run's keys: run names cannot hold glob characters."""
    rk = keys.RunKeys(settings.key_prefix, run)
    run_keys = [k async for k in redis.scan_iter(match=rk.pattern, count=1000)]
    jobs = [j.decode() async for j, _ in redis.zscan_iter(settings.queue_name, match=f"{run}:*")]
    for i in range(0, len(jobs), 1000):
        chunk = jobs[i : i + 1000]
        await redis.zrem(settings.queue_name, *chunk)
        await redis.delete(*[f(j) for j in chunk for f in (keys.arq_job, keys.arq_retry, keys.arq_in_progress)])
    train_job = keys.train_job_id(run)
    await redis.zrem(settings.train_queue_name, train_job)
    await redis.delete(*[f(train_job) for f in (keys.arq_job, keys.arq_retry, keys.arq_in_progress, keys.arq_result)])
    if run_keys:
        await redis.delete(*run_keys)
    await redis.srem(keys.runs_index(settings.key_prefix), run)
    return len(run_keys), len(jobs)


async def resume(redis: ArqRedis, settings: Settings, run: str,
                 limits: dict[str, int | float] | None = None) -> EnqueueSummary:
    """Raise the run's budget by `limits`, close its breaker, make its deferred jobs due now, and re-enqueue the
    prompts that failed on the configuration error. A run that its budget paused stays paused (HegelionError)
    until the limit it reached is raised."""
    rk = keys.RunKeys(settings.key_prefix, run)
    await budget.set_limits(redis, rk, limits or {})
    if (why := budget.reached(await budget.read(redis, rk))) is not None:
        kind = why.split()[0]
        raise HegelionError(f"run {run} has spent its budget ({why}): raise it, e.g. `hegelion-queue resume --run "
                            f"{run} {budget.FLAGS[kind]} N` with N above what was spent")
    await redis.delete(rk.breaker, rk.config_errors)
    now = int(time.time() * 1000)
    async for jid, _ in redis.zscan_iter(settings.queue_name, match=f"{run}:*"):
        await redis.zadd(settings.queue_name, {jid: now}, xx=True)
    return await retry_failed(redis, settings, run, reason="config")
