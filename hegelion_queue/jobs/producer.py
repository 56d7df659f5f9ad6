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
import base64
import itertools
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator, Callable, Iterable

import orjson
from arq.connections import ArqRedis

from ..queue import budget
from .. import keys
from ..dataset import provenance
from ..queue import codec as codecs
from ..errors import HegelionError
from ..sources.read import Prompt
from ..settings import Settings
from ..queue.scripts import DEAD_INDEX_LUA
from ..queue.store import dead_letter_batches, letters_of, mark_finished_if_complete
from .training_job import training

logger = logging.getLogger("hegelion.producer")

BATCH = 2000

# One argument per job: its payload (a zstd frame of the prompt record, see job_payload), and the batch's prompt
# ids in one string (64 hex characters each) and again as digests (32 bytes each): packing arguments is most of
# the client's cost. arq's own keys are built here from the job id, as arq builds them (arq is not cluster-safe
# either). Empty done-set / dead hash skip their per-job lookups. revive = 1 (retry-failed): a dead-lettered prompt
# gets a fresh start, atomically with its new job. The `enqueued` set, which only counts, keeps digests (48 bytes a
# member instead of 80); a prompt of a run enqueued before that is found there in hex and not counted twice.
ENQUEUE_LUA = DEAD_INDEX_LUA + """
local queue, done, enqueued, dead, finished, attempts, tokens, dead_reasons, dead_counts = unpack(KEYS)
local score, revive, run, pids, digests = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local check_done = redis.call('SCARD', done) > 0
local check_dead = redis.call('HLEN', dead) > 0
local added, already_done, already_queued, already_dead = 0, 0, 0, 0
local zadd, sadd = {}, {}
for i = 6, #ARGV do
  local payload = ARGV[i]
  local pid = string.sub(pids, (i - 6) * 64 + 1, (i - 5) * 64)
  local jid = run .. ':' .. pid
  local job_key = 'arq:job:' .. jid
  if revive == '1' and redis.call('SISMEMBER', done, pid) == 0 and redis.call('EXISTS', job_key) == 0 then
    dead_forget(dead, dead_reasons, dead_counts, pid)
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
    if redis.call('SISMEMBER', enqueued, pid) == 0 then
      sadd[#sadd + 1] = string.sub(digests, (i - 6) * 32 + 1, (i - 5) * 32)
    end
    added = added + 1
  end
end
if added > 0 then
  redis.call('ZADD', queue, unpack(zadd))
  if #sadd > 0 then redis.call('SADD', enqueued, unpack(sadd)) end
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
    dictionaries_missing: list[int] | None = None  # retry-failed: letters that still wait for these dictionaries

    def add(self, counts: list[int]) -> None:
        self.enqueued += counts[0]
        self.already_done += counts[1]
        self.already_queued += counts[2]
        self.already_dead += counts[3]


def job_payload(codec: codecs.Codec, record: dict[str, Any]) -> bytes:
    """A generator job as the queue keeps it: a zstd frame of the prompt record without its prompt id (the job id
    holds it); the worker's deserializer (connection.load_job) and `generate` read it back. arq's JSON layout
    (`{"f": "generate", "a": [record], …}`) is read too."""
    return codec.pack({k: v for k, v in record.items() if k != "prompt_id"})




def prompt_record(run: str, p: Prompt, dataset: str, split: str, config_id: str = "",
                  cache: str = "") -> dict[str, Any]:
    record = {"prompt_id": p.prompt_id, "run": run, "prompt": p.text,
              "source": {"dataset": dataset, "split": split, "row": p.row}}
    if config_id:  # the run's configuration (provenance.py): the sample made from this job carries it
        record["config_id"] = config_id
    if cache:  # its teacher's answer cache (provenance.teacher_id): reused from there, indexed there
        record["cache"] = cache
    return record


async def enqueue_records(
    redis: ArqRedis,
    settings: Settings,
    run: str,
    records: Iterable[dict[str, Any]],
    progress: Callable[[int], None] | None = None,
    revive: bool = False,
    codec: codecs.Codec | None = None,
    summary: EnqueueSummary | None = None,
) -> EnqueueSummary:
    """Enqueue prompt records (see `prompt_record`) for `run`, BATCH per Lua call, packed with `codec` (default:
    the run's); counts are added to `summary` when given. `records` is read a batch at a time."""
    rk = keys.RunKeys(settings.key_prefix, run)
    script = redis.register_script(ENQUEUE_LUA)
    summary = summary or EnqueueSummary(run=run)
    run_keys = [settings.queue_name, rk.done, rk.enqueued, rk.dead, rk.finished, rk.attempts, rk.attempt_tokens,
                rk.dead_reasons, rk.dead_counts]
    pending: asyncio.Future | None = None
    rest = iter(records)
    while batch := list(itertools.islice(rest, BATCH)):
        codec = codec or await codecs.for_run(redis, rk)
        summary.sampled += len(batch)
        now = int(time.time() * 1000)
        if not all(keys.PROMPT_ID.match(rec["prompt_id"]) for rec in batch):
            raise ValueError("prompt ids must be sha256 hex digests")
        pids = "".join(rec["prompt_id"] for rec in batch)
        args = [now, int(revive), run, pids, bytes.fromhex(pids), *(job_payload(codec, rec) for rec in batch)]
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
    prompts: list[Prompt] | Iterable[list[Prompt]],
    meta: dict[str, Any],
    progress: Callable[[int], None] | None = None,
    *,
    config: dict[str, Any] | None = None,
    allow_config_change: bool = False,
    limits: dict[str, int | float] | None = None,
    command: str = "",
    cache: bool = True,
) -> EnqueueSummary:
    """Record the run's configuration (refused, with nothing written, when it differs from the run's own and no
    change is allowed), budget, command and metadata, enqueue its prompts (a list, or batches of them:
    `PromptSample.batches()`), then mark the enqueue complete. The run's zstd dictionary is trained on the first
    batch at its first enqueue. `cache`: its jobs reuse (and index) answers of the same teacher configuration."""
    t0 = time.perf_counter()
    rk = keys.RunKeys(settings.key_prefix, run)
    dataset, split = str(meta.get("dataset", "")), str(meta.get("split", ""))
    cid = await provenance.record(redis, rk, config, allow_config_change) if config is not None else ""
    tid = provenance.teacher_id(config) if config is not None and cache and settings.cache else ""
    meta = {**meta, "teacher_id": provenance.teacher_id(config) if config is not None else ""}
    await budget.set_limits(redis, rk, limits or {})
    await provenance.record_command(redis, rk, command)
    now = time.time()
    await redis.sadd(keys.runs_index(settings.key_prefix), run)
    await redis.hsetnx(rk.meta, "created_at", now)
    await redis.hset(
        rk.meta,
        mapping={**{k: _meta_value(v) for k, v in meta.items()}, "updated_at": now, "enqueue_complete": 0},
    )
    batches = [prompts] if isinstance(prompts, list) else prompts
    summary = EnqueueSummary(run=run)
    codec = None
    for batch in batches:
        if codec is None:
            head = ((p.text, p.row) for p in batch[: codecs.TRAIN_MAX])
            codec = await codecs.ensure_dictionary(redis, rk, codecs.training_samples(run, dataset, split, head))
            # a copy on disk: what `restore-dictionary` puts back should Redis ever lose it
            codecs.write_dictionaries(await codecs.stored_dictionaries(redis, rk), settings.jsonl_path(run))
        records = (prompt_record(run, p, dataset, split, cid, tid) for p in batch)
        await enqueue_records(redis, settings, run, records, progress, codec=codec, summary=summary)
    summary.seconds = time.perf_counter() - t0
    # enqueue_complete and the finished check in one script: a producer cut short between them would leave a
    # run whose prompts are all done unfinished, with no training job, forever
    await mark_finished_if_complete(redis, rk, training(settings, run), orjson.dumps(asdict(summary)))
    return summary


def _meta_value(v: Any) -> Any:
    return "" if v is None else (orjson.dumps(v) if isinstance(v, (dict, list)) else v)


async def retry_failed(redis: ArqRedis, settings: Settings, run: str, reason: str | None = None) -> EnqueueSummary:
    """Re-enqueue the dead-lettered prompts of `run` (those with `reason`, or all) with a fresh attempt count, a
    batch of letters at a time. A letter without a prompt record (an unreadable payload) has nothing to re-enqueue
    and stays; a letter that kept its job's packed payload (its dictionary was missing) is revived once the
    dictionary is back, and a run that the missing dictionary paused is resumed. They are made again under the
    run's configuration of now."""
    rk = keys.RunKeys(settings.key_prefix, run)
    cid = await redis.hget(rk.meta, "config_id")
    stamp = {"config_id": cid.decode()} if cid else {}
    summary = EnqueueSummary(run=run)
    still_missing: set[int] = set()
    async for batch in dead_letter_batches(redis, rk):
        records = []
        for letter in await letters_of(redis, rk, batch):
            if reason not in (None, letter.get("reason")):
                continue
            record = letter.get("record")
            if not record and letter.get("packed"):
                try:
                    record = await _unpacked(redis, rk, letter)
                except codecs.DictionaryMissing as e:
                    still_missing.add(e.dict_id)
            if record:
                records.append({**record, **stamp})
        await enqueue_records(redis, settings, run, records, revive=True, summary=summary)
    summary.dictionaries_missing = sorted(still_missing)
    if not still_missing and (await redis.hget(rk.breaker, "kind")) == b"dictionary":
        await _wake(redis, settings, rk)
    return summary


async def _unpacked(redis: ArqRedis, rk: keys.RunKeys, letter: dict[str, Any]) -> dict[str, Any]:
    """The prompt record a `dictionary` letter kept packed."""
    packed = base64.b64decode(letter["packed"])
    record = (await codecs.of_frame(redis, rk, packed)).unpack(packed)
    return {"prompt_id": letter["prompt_id"], **record}


async def _wake(redis: ArqRedis, settings: Settings, rk: keys.RunKeys) -> None:
    """Close the run's breaker and make its resting jobs due now."""
    await redis.delete(rk.breaker, rk.config_errors)
    now = int(time.time() * 1000)
    async for jobs in _queued_jobs(redis, settings, rk.run):
        await redis.zadd(settings.queue_name, dict.fromkeys(jobs, now), xx=True)


PURGE_BATCH = 1000


async def _queued_jobs(redis: ArqRedis, settings: Settings, run: str) -> AsyncIterator[list[str]]:
    """The run's job ids in the queue, PURGE_BATCH at a time as the queue is scanned (Redis is never held long)."""
    chunk: list[str] = []
    async for j, _ in redis.zscan_iter(settings.queue_name, match=f"{run}:*", count=PURGE_BATCH):
        chunk.append(j.decode())
        if len(chunk) == PURGE_BATCH:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# One batch of a purge in one script: the jobs' keys go with their queue entries, so an interrupted purge leaves no
# job key behind that a re-enqueue would count as already queued (and never run); a re-sent batch finds nothing.
PURGE_LUA = """
local queue = KEYS[1]
local job, retry, running = ARGV[1], ARGV[2], ARGV[3]
for i = 4, #ARGV do
  local jid = ARGV[i]
  redis.call('UNLINK', job .. jid, retry .. jid, running .. jid)
  redis.call('ZREM', queue, jid)
end
return #ARGV - 3
"""


async def in_progress(redis: ArqRedis, settings: Settings, run: str) -> list[str]:
    """The run's jobs a worker is running now (arq's in-progress keys)."""
    busy: list[str] = []
    async for jobs in _queued_jobs(redis, settings, run):
        async with redis.pipeline(transaction=False) as p:
            for j in jobs:
                p.exists(keys.arq_in_progress(j))
            flags = await p.execute()
        busy += [j for j, running in zip(jobs, flags) if running]
    return busy


async def purge_run(redis: ArqRedis, settings: Settings, run: str, force: bool = False) -> tuple[int, int]:
    """Delete one run's keys, its queued jobs and its training job (so the same run name starts afresh and is
    trained again); (keys deleted, jobs removed). Never another run's keys: run names cannot hold glob characters.
    Refused while a worker runs one of the run's jobs (its commit would land in the new run), unless `force`.
    Redis is never held long: queued jobs go PURGE_BATCH at a time as the queue is scanned, and the run's keys with
    UNLINK, which frees a large set, hash or stream in the background instead of in Redis' main thread. The run's
    zstd dictionary is kept (by id, see codec.py): a job still in flight can read its payload."""
    rk = keys.RunKeys(settings.key_prefix, run)
    if not force and (busy := await in_progress(redis, settings, run)):
        shown = ", ".join(busy[:5]) + (f" and {len(busy) - 5} more" if len(busy) > 5 else "")
        raise HegelionError(f"run {run} has {len(busy)} jobs in progress ({shown}): stop its workers or wait, "
                            f"or purge anyway with --force (a job still running then commits into the new run)")
    script = redis.register_script(PURGE_LUA)
    n_jobs = 0
    prefixes = [keys.arq_job(""), keys.arq_retry(""), keys.arq_in_progress("")]
    async for jobs in _queued_jobs(redis, settings, run):
        n_jobs += await script(keys=[settings.queue_name], args=[*prefixes, *jobs])
    train_job = keys.train_job_id(run)
    await redis.zrem(settings.train_queue_name, train_job)
    await redis.unlink(*[f(train_job) for f in (keys.arq_job, keys.arq_retry, keys.arq_in_progress, keys.arq_result)])
    run_keys = [k async for k in redis.scan_iter(match=rk.pattern, count=1000)]
    if run_keys:
        await redis.unlink(*run_keys)
    await redis.srem(keys.runs_index(settings.key_prefix), run)
    return len(run_keys), n_jobs


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
    await _wake(redis, settings, rk)
    return await retry_failed(redis, settings, run, reason="config")
