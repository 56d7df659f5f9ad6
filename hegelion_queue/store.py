"""Exactly-once results: the Lua commit, dead letters, and the JSONL that is materialised from Redis.

A sample is committed by one script: SADD the run's done-set and, only if that added it, XADD the sample
to the run's results stream. The stream is the source of truth; a JSONL file is a copy made by `flush`
under an exclusive flock, whose checkpoint is the stream id in the file's own last line, so a crash
between append and checkpoint cannot duplicate, and a line cut mid-write is cut off and written again.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from redis.asyncio import Redis

from .errors import HegelionError
from .keys import RunKeys

logger = logging.getLogger("hegelion.store")

XRANGE_COUNT = 1000
TAIL_CHUNK = 64 * 1024

# Shared by the scripts below: the run is finished once its enqueue is complete and every enqueued
# prompt is done or dead. SET NX makes "finished" happen once, so one training job is triggered.
_FINISHED_LUA = """
local function finished_check(enqueued, done, dead, meta, finished, now)
  if redis.call('HGET', meta, 'enqueue_complete') ~= '1' then return 0 end
  local total = redis.call('SCARD', enqueued)
  if total > 0 and redis.call('SCARD', done) + redis.call('HLEN', dead) >= total then
    if redis.call('SET', finished, now, 'NX') then return 1 end
  end
  return 0
end
"""

COMMIT_LUA = (
    _FINISHED_LUA
    + """
local done, results, dead, enqueued, meta, finished, config_errors, timeline, stats, dead_reasons = unpack(KEYS)
local pid, sample, now, seconds = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('SADD', done, pid) == 0 then return {0, false, 0} end
local id = redis.call('XADD', results, '*', 's', sample)
redis.call('HINCRBY', timeline, math.floor(tonumber(now) / 60), 1)
redis.call('HINCRBYFLOAT', stats, 'teacher_seconds', seconds)
for i = 5, #ARGV, 2 do redis.call('HINCRBYFLOAT', stats, 'usage_' .. ARGV[i], ARGV[i + 1]) end
redis.call('HDEL', dead, pid)
redis.call('HDEL', dead_reasons, pid)
redis.call('DEL', config_errors)
return {1, id, finished_check(enqueued, done, dead, meta, finished, now)}
"""
)

# Before a teacher call, in one round trip: a paused run waits (-1), a done prompt costs nothing (0),
# otherwise the attempt is counted first, so a worker that dies mid-call still used it up.
BEGIN_LUA = """
local breaker, done, attempts = KEYS[1], KEYS[2], KEYS[3]
if redis.call('EXISTS', breaker) == 1 then return -1 end
if redis.call('SISMEMBER', done, ARGV[1]) == 1 then return 0 end
return redis.call('HINCRBY', attempts, ARGV[1], 1)
"""

DEAD_LUA = (
    _FINISHED_LUA
    + """
local done, dead, enqueued, meta, finished, dead_reasons = unpack(KEYS)
local pid, letter, now, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('SISMEMBER', done, pid) == 1 then return {0, 0} end
redis.call('HSET', dead, pid, letter)
redis.call('HSET', dead_reasons, pid, reason)
return {1, finished_check(enqueued, done, dead, meta, finished, now)}
"""
)

CHECK_FINISHED_LUA = (
    _FINISHED_LUA
    + """
local done, dead, enqueued, meta, finished = unpack(KEYS)
return finished_check(enqueued, done, dead, meta, finished, ARGV[1])
"""
)


_scripts: dict[str, Any] = {}


async def _eval(redis: Redis, script: str, keys: list[str], *args: Any) -> Any:
    """EVALSHA of a script (loaded on first use), not EVAL: the hot path sends no script text."""
    if script not in _scripts:
        _scripts[script] = redis.register_script(script)
    return await _scripts[script](keys=keys, args=list(args), client=redis)


async def begin_attempt(redis: Redis, rk: RunKeys, prompt_id: str) -> int:
    """-1: the run is paused; 0: the prompt is done; else the number of this attempt."""
    return await _eval(redis, BEGIN_LUA, [rk.breaker, rk.done, rk.attempts], prompt_id)


async def commit(
    redis: Redis, rk: RunKeys, prompt_id: str, sample: dict[str, Any], seconds: float = 0.0,
    usage: dict[str, Any] | None = None,
) -> tuple[bool, str | None, bool]:
    """(committed, stream id, run finished now). committed is False when the prompt was already done.
    The teacher time and token usage are counted with the sample, in the same script."""
    keys = [rk.done, rk.results, rk.dead, rk.enqueued, rk.meta, rk.finished, rk.config_errors, rk.timeline, rk.stats,
            rk.dead_reasons]
    counts = [x for k, v in (usage or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
              for x in (k, v)]
    added, entry_id, finished = await _eval(
        redis, COMMIT_LUA, keys, prompt_id, orjson.dumps(sample), time.time(), seconds, *counts
    )
    return bool(added), (entry_id.decode() if entry_id else None), bool(finished)


async def dead_letter(redis: Redis, rk: RunKeys, prompt_id: str, letter: dict[str, Any]) -> tuple[bool, bool]:
    """(written, run finished now). Not written when the prompt is already done."""
    keys = [rk.done, rk.dead, rk.enqueued, rk.meta, rk.finished, rk.dead_reasons]
    letter = {**letter, "time": time.time()}
    written, finished = await _eval(redis, DEAD_LUA, keys, prompt_id, orjson.dumps(letter), time.time(),
                                    str(letter.get("reason", "?")))
    return bool(written), bool(finished)


async def mark_finished_if_complete(redis: Redis, rk: RunKeys) -> bool:
    keys = [rk.done, rk.dead, rk.enqueued, rk.meta, rk.finished]
    return bool(await _eval(redis, CHECK_FINISHED_LUA, keys, time.time()))


# ---------------------------------------------------------------- reading samples and dead letters back


async def newest(redis: Redis, rk: RunKeys, n: int) -> list[tuple[str, dict[str, Any]]]:
    """The run's `n` newest samples, oldest first, with their stream ids."""
    entries = await redis.xrevrange(rk.results, count=n)
    return [(eid.decode(), orjson.loads(fields[b"s"])) for eid, fields in reversed(entries)]


async def dead_letters(redis: Redis, rk: RunKeys, limit: int | None = None) -> list[dict[str, Any]]:
    """The run's dead letters (each with its `prompt_id`), newest first; `limit` reads no more than about
    that many from Redis (a letter keeps up to 64 KiB of raw teacher output)."""
    if limit is None:
        items = (await redis.hgetall(rk.dead)).items()
    else:
        items = []
        async for item in redis.hscan_iter(rk.dead, count=limit):
            items.append(item)
            if len(items) >= limit:
                break
    letters = [{**orjson.loads(v), "prompt_id": k.decode()} for k, v in items]
    return sorted(letters, key=lambda x: x.get("time") or 0, reverse=True)


# ---------------------------------------------------------------- JSONL materialisation


def jsonl_line(entry_id: bytes | str, fields: dict[bytes, bytes]) -> bytes:
    """One JSONL line from a stream entry; the entry id goes into the trace (it is the file's checkpoint)."""
    sample = orjson.loads(fields[b"s"])
    sample["hegelion_trace"]["stream_id"] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return orjson.dumps(sample) + b"\n"


def repair_tail(f: BinaryIO) -> str | None:
    """Cut a last line that a crash left without its newline; return the stream id of the last full line."""
    end = f.seek(0, os.SEEK_END)
    pos, buf = end, b""
    while pos > 0:
        step = min(TAIL_CHUNK, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
        cut = buf.rfind(b"\n")
        if cut == len(buf) - 1:  # the file ends with a newline: look for the line before it
            prev = buf.rfind(b"\n", 0, cut)
            if prev >= 0 or pos == 0:
                return _checkpoint(buf[prev + 1 : cut], f.name)
        elif cut >= 0 or pos == 0:  # a partial last line: drop it
            keep = pos + cut + 1
            logger.warning("%s: dropping a last line cut mid-write (%d bytes)", f.name, end - keep)
            f.truncate(keep)
            f.seek(0, os.SEEK_END)
            return repair_tail(f) if keep else None
    return None


def _checkpoint(line: bytes, name: str) -> str:
    try:
        return orjson.loads(line)["hegelion_trace"]["stream_id"]
    except Exception as e:
        raise HegelionError(
            f"{name}: the last line is not a sample written by hegelion-queue ({e}); move the file away "
            "and rebuild it with `hegelion-queue export`"
        ) from e


async def _append_from(redis: Redis, rk: RunKeys, f: BinaryIO, after: str | None) -> int:
    """Append every stream entry after `after` to f; returns how many."""
    written = 0
    start = f"({after}" if after else "-"
    while True:
        entries = await redis.xrange(rk.results, min=start, max="+", count=XRANGE_COUNT)
        if not entries:
            break
        f.write(b"".join(jsonl_line(eid, fields) for eid, fields in entries))
        written += len(entries)
        start = f"({entries[-1][0].decode()}"
    f.flush()
    os.fsync(f.fileno())
    return written


_process_locks: dict[str, asyncio.Lock] = {}


async def flush(redis: Redis, rk: RunKeys, path: Path) -> int:
    """Bring the JSONL at `path` up to date with the run's stream; safe with any number of writers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _process_locks.setdefault(str(path), asyncio.Lock())  # flock does not order tasks of one process
    async with lock:
        with open(path, "a+b") as f:
            await asyncio.to_thread(fcntl.flock, f.fileno(), fcntl.LOCK_EX)
            try:
                return await _append_from(redis, rk, f, repair_tail(f))
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


async def export(redis: Redis, rk: RunKeys, path: Path) -> int:
    """Write the run's complete, ordered, duplicate-free JSONL to `path` (atomically replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            n = await _append_from(redis, rk, f, None)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n
