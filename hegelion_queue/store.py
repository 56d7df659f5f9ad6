"""Exactly-once results: the Lua commit, dead letters, and the JSONL that is materialised from Redis.

A sample is committed by one script: SADD the run's done-set and, only if that added it, XADD the sample
to the run's results stream. The stream is the source of truth; a JSONL file is a copy made by `flush`
under an exclusive flock, whose checkpoint is the stream id in the file's own last line, so a crash
between append and checkpoint cannot duplicate, and a line cut mid-write is cut off and written again. A
checkpoint the stream no longer holds (purge, a lossy restore) sets the file aside and rebuilds it.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, BinaryIO

import orjson
import zstandard
from redis.asyncio import Redis

from . import codec as codecs
from .budget import SPENT_LUA
from .codec import Codec
from .errors import HegelionError
from .keys import RunKeys, arq_job, arq_result

logger = logging.getLogger("hegelion.store")

XRANGE_COUNT = 2000
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
LETTER_BATCH = 500
TAIL_CHUNK = 64 * 1024

# Shared by the scripts below: the run is finished once its enqueue is complete and every enqueued
# prompt is done or dead. SET NX makes "finished" happen once, and the run's training job is written in
# the same script (arq's own job key, no TTL, and its queue entry, keeping arq's "already queued / result
# kept" check): a lost reply, a worker that dies after the commit or a producer cut short cannot lose it.
_TRAIN_LUA = """
local function enqueue_training(queue, job, result, id, payload, score)
  if payload == '' or redis.call('EXISTS', job, result) > 0 then return 0 end
  redis.call('SET', job, payload)
  redis.call('ZADD', queue, score, id)
  return 1
end
"""

# The run's dead letters, the reason index `status` counts them by (pid -> reason) and the count per reason that
# keeps `status` O(1) in the number of letters, changed together by every script that writes or removes a letter.
DEAD_INDEX_LUA = """
local function dead_forget(dead, reasons, counts, pid)
  local reason = redis.call('HGET', reasons, pid)
  if reason then
    redis.call('HDEL', reasons, pid)
    if redis.call('HINCRBY', counts, reason, -1) <= 0 then redis.call('HDEL', counts, reason) end
  end
  redis.call('HDEL', dead, pid)
end
local function dead_write(dead, reasons, counts, pid, letter, reason)
  dead_forget(dead, reasons, counts, pid)
  redis.call('HSET', dead, pid, letter)
  redis.call('HSET', reasons, pid, reason)
  redis.call('HINCRBY', counts, reason, 1)
end
"""

_FINISHED_LUA = _TRAIN_LUA + DEAD_INDEX_LUA + """
-- The enqueued set only counts: it keeps a sha256 prompt id as its 32-byte digest, as the producer adds it (a run
-- enqueued before that keeps hex, which counts already).
local function count_enqueued(enqueued, pid)
  if redis.call('SISMEMBER', enqueued, pid) == 1 then return end
  if #pid == 64 and not string.find(pid, '[^0-9a-f]') then
    pid = (string.gsub(pid, '..', function(h) return string.char(tonumber(h, 16)) end))
  end
  redis.call('SADD', enqueued, pid)
end
local function finished_check(enqueued, done, dead, meta, finished, now, train_queue, train_job, train_result,
                              train_id, train_payload, train_score)
  if redis.call('HGET', meta, 'enqueue_complete') ~= '1' then return 0 end
  local total = redis.call('SCARD', enqueued)
  local ndone = redis.call('SCARD', done)
  if total > 0 and ndone + redis.call('HLEN', dead) >= total then
    if redis.call('SET', finished, now, 'NX') then
      if ndone > 0 then
        enqueue_training(train_queue, train_job, train_result, train_id, train_payload, train_score)
      end
      return 1
    end
  end
  return 0
end
"""

COMMIT_LUA = (
    _FINISHED_LUA
    + """
local done, results, dead, enqueued, meta, finished, config_errors, timeline, stats, dead_reasons, dead_counts,
  attempts, tokens, spent, cache, tq, tj, tr = unpack(KEYS)
local pid, sample, now, seconds, tid, tpayload, tscore = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local pointer, reused, chars, digest = ARGV[8], ARGV[9], ARGV[10], ARGV[11]
if redis.call('SADD', done, pid) == 0 then return {0, false, 0} end
count_enqueued(enqueued, pid)  -- a no-op for a produced prompt; keeps done + dead + pending = enqueued
local id = redis.call('XADD', results, '*', 's', sample)
redis.call('HINCRBY', timeline, math.floor(tonumber(now) / 60), 1)
if pointer ~= '' then redis.call('HSET', cache, digest, pointer .. id) end  -- the answer cache: the newest copy
if reused == '1' then
  redis.call('HINCRBY', stats, 'cached', 1)
else
  redis.call('HINCRBYFLOAT', stats, 'teacher_seconds', seconds)
  redis.call('HINCRBY', stats, 'prompt_chars', chars)  -- what `estimate` divides the tokens by
end
for i = 12, #ARGV, 2 do redis.call('HINCRBYFLOAT', stats, 'usage_' .. ARGV[i], ARGV[i + 1]) end
dead_forget(dead, dead_reasons, dead_counts, pid)
redis.call('HDEL', attempts, pid)  -- a done prompt is never attempted again: its counter and token only took memory
redis.call('HDEL', tokens, pid)
redis.call('HDEL', spent, pid)
redis.call('DEL', config_errors)
return {1, id, finished_check(enqueued, done, dead, meta, finished, now, tq, tj, tr, tid, tpayload, tscore)}
"""
)

# Before a teacher call, in one round trip: a paused run waits (-1), a done prompt costs nothing (0),
# otherwise the attempt is counted first, so a worker that dies mid-call still used it up. The attempt
# carries a token: a re-sent script (its reply was lost) returns the same attempt instead of counting again —
# checked first, so a breaker opened between the two sends cannot turn a counted attempt into a -1 never refunded.
# A run with a budget (budget.py) is checked here too: a limit reached pauses the run (reason `budget`) and no
# call starts; every call that does start is counted in the run's `teacher_calls`.
BEGIN_LUA = SPENT_LUA + """
local breaker, done, attempts, tokens, budget, stats = unpack(KEYS)
local pid, token, peek, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if peek ~= '1' and redis.call('HGET', tokens, pid) == token then  -- a re-send: this attempt is counted already
  return tonumber(redis.call('HGET', attempts, pid))
end
if redis.call('EXISTS', breaker) == 1 then return -1 end
if redis.call('SISMEMBER', done, pid) == 1 then return 0 end
if peek == '1' then return 1 end
local limits = redis.call('HGETALL', budget)
if #limits > 0 then
  local why = budget_reached(limits, stats)
  if why then
    redis.call('HSET', breaker, 'reason', 'budget', 'budget', why, 'since', now)
    return -1
  end
end
redis.call('HINCRBY', stats, 'teacher_calls', 1)
redis.call('HSET', tokens, pid, token)
return redis.call('HINCRBY', attempts, pid, 1)
"""

# A teacher call that ended without a commit (an invalid answer, a transient or configuration error, a timeout)
# spent tokens and seconds too: they count for the run's budget and stats, once per attempt (its token: a re-sent
# script counts nothing twice). A commit counts its own call's in COMMIT_LUA.
SPEND_LUA = """
local stats, spent = KEYS[1], KEYS[2]
local pid, token, seconds = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HGET', spent, pid) == token then return 0 end
redis.call('HSET', spent, pid, token)
redis.call('HINCRBYFLOAT', stats, 'teacher_seconds', seconds)
for i = 4, #ARGV, 2 do redis.call('HINCRBYFLOAT', stats, 'usage_' .. ARGV[i], ARGV[i + 1]) end
return 1
"""

# An attempt that never reached its outcome (the job was cancelled: SIGTERM drain, abort) is given back,
# once: the token is removed with it.
REFUND_LUA = """
local attempts, tokens = KEYS[1], KEYS[2]
local pid, token = ARGV[1], ARGV[2]
if redis.call('HGET', tokens, pid) ~= token then return 0 end
redis.call('HDEL', tokens, pid)
redis.call('HINCRBY', attempts, pid, -1)
return 1
"""

# A configuration error: the prompt joins the run's set of them (a set, so a re-sent call counts once); at
# `threshold` in a row the breaker opens and the run pauses. A commit empties the set.
CONFIG_ERROR_LUA = """
local errors, breaker = KEYS[1], KEYS[2]
local pid, why, threshold, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
redis.call('SADD', errors, pid)
local n = redis.call('SCARD', errors)
if n >= threshold and redis.call('HSETNX', breaker, 'reason', why) == 1 then
  redis.call('HSET', breaker, 'since', now, 'errors', n)
  return {n, 1}
end
return {n, 0}
"""

DEAD_LUA = (
    _FINISHED_LUA
    + """
local done, dead, enqueued, meta, finished, dead_reasons, dead_counts, tq, tj, tr = unpack(KEYS)
local pid, letter, now, reason, tid, tpayload, tscore = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
if redis.call('SISMEMBER', done, pid) == 1 then return {0, 0} end
dead_write(dead, dead_reasons, dead_counts, pid, letter, reason)
count_enqueued(enqueued, pid)  -- an unreadable payload was a job too: done + dead + pending = enqueued
return {1, finished_check(enqueued, done, dead, meta, finished, now, tq, tj, tr, tid, tpayload, tscore)}
"""
)

# The producer's last step: the enqueue is complete, and the run may be finished already (every prompt
# done before the producer got here), in one script so that no interruption can fall between the two.
COMPLETE_LUA = (
    _FINISHED_LUA
    + """
local done, dead, enqueued, meta, finished, tq, tj, tr = unpack(KEYS)
local now, tid, tpayload, tscore, summary = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if summary ~= '' then redis.call('HSET', meta, 'enqueue_complete', 1, 'last_enqueue', summary) end
return finished_check(enqueued, done, dead, meta, finished, now, tq, tj, tr, tid, tpayload, tscore)
"""
)


ENQUEUE_TRAINING_LUA = _TRAIN_LUA + "return enqueue_training(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])"


@dataclass(frozen=True)
class Training:
    """The training job a run's finish writes in the same script: its queue, job id and arq payload
    (an empty payload: no training, HEGELION_AUTO_TRAIN=0)."""

    queue: str
    job_id: str
    payload: bytes = b""

    def keys(self) -> list[str]:
        return [self.queue, arq_job(self.job_id), arq_result(self.job_id)]

    def args(self) -> list[Any]:
        return [self.job_id, self.payload, int(time.time() * 1000)]


_scripts: dict[str, Any] = {}


async def _eval(redis: Redis, script: str, keys: list[str], *args: Any) -> Any:
    """EVALSHA of a script (loaded on first use), not EVAL: the hot path sends no script text."""
    if script not in _scripts:
        _scripts[script] = redis.register_script(script)
    return await _scripts[script](keys=keys, args=list(args), client=redis)


async def begin_attempt(redis: Redis, rk: RunKeys, prompt_id: str, token: str = "", peek: bool = False) -> int:
    """-1: the run is paused (now, if its budget is spent); 0: the prompt is done; else the number of this attempt
    (`token` names it, so a re-sent call counts once). peek: only look (1 = go ahead), count nothing."""
    keys = [rk.breaker, rk.done, rk.attempts, rk.attempt_tokens, rk.budget, rk.stats]
    return await _eval(redis, BEGIN_LUA, keys, prompt_id, token, int(peek), time.time())


def _usage_args(usage: dict[str, Any] | None) -> list[Any]:
    return [x for k, v in (usage or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            for x in (k, v)]


async def spend(redis: Redis, rk: RunKeys, prompt_id: str, token: str, seconds: float,
                usage: dict[str, Any] | None = None) -> bool:
    """Count the tokens and seconds of attempt `token`'s call, which ended without a commit (once: False on a
    re-send)."""
    return bool(await _eval(redis, SPEND_LUA, [rk.stats, rk.spent], prompt_id, token, seconds, *_usage_args(usage)))


async def pause(redis: Redis, rk: RunKeys, reason: str, kind: str) -> bool:
    """Open the run's breaker (it pauses: its jobs rest until `resume`); False when it was open already."""
    opened = await redis.hsetnx(rk.breaker, "reason", reason)
    if opened:
        await redis.hset(rk.breaker, mapping={"kind": kind, "since": time.time()})
    return bool(opened)


async def refund_attempt(redis: Redis, rk: RunKeys, prompt_id: str, token: str) -> bool:
    return bool(await _eval(redis, REFUND_LUA, [rk.attempts, rk.attempt_tokens], prompt_id, token))


async def enqueue_training(redis: Redis, training: Training) -> bool:
    """Write the training job (no TTL) unless it is queued, running or its result is kept."""
    return bool(await _eval(redis, ENQUEUE_TRAINING_LUA, training.keys(), *training.args()))


async def config_error(redis: Redis, rk: RunKeys, prompt_id: str, why: str, threshold: int) -> tuple[int, bool]:
    """(configuration errors in a row, the breaker opened now)."""
    n, opened = await _eval(redis, CONFIG_ERROR_LUA, [rk.config_errors, rk.breaker], prompt_id, why, threshold,
                            time.time())
    return n, bool(opened)


def _finish_keys(rk: RunKeys) -> list[str]:
    return [rk.done, rk.dead, rk.enqueued, rk.meta, rk.finished]


def pack_sample(codec: Codec, sample: dict[str, Any]) -> bytes:
    """A sample as the stream keeps it: a zstd frame of its JSON, `hegelion_trace` last and without a stream id
    (`jsonl_line` appends the entry's id to the trace without parsing the sample again)."""
    trace = {k: v for k, v in sample["hegelion_trace"].items() if k != "stream_id"}
    return codec.pack({**{k: v for k, v in sample.items() if k != "hegelion_trace"}, "hegelion_trace": trace})


@dataclass(frozen=True)
class CacheEntry:
    """How a commit meets the answer cache: the cache hash it indexes its sample in (keys.answer_cache; '': none),
    and whether the sample is itself a reused answer (counted as `cached`, no teacher time)."""

    key: str = ""
    reused: bool = False


async def commit(
    redis: Redis, rk: RunKeys, prompt_id: str, sample: dict[str, Any], seconds: float = 0.0,
    usage: dict[str, Any] | None = None, training: Training | None = None, codec: Codec | None = None,
    cache: CacheEntry = CacheEntry(),
) -> tuple[bool, str | None, bool]:
    """(committed, stream id, run finished now). committed is False when the prompt was already done.
    The teacher time and token usage are counted with the sample, in the same script, and the sample is indexed in
    the answer cache (`cache`). `codec`: the one the job's payload was packed with (default: the run's)."""
    t = training or Training("", "")
    indexed = bool(cache.key) and _SHA256.match(prompt_id) is not None
    keys = [rk.done, rk.results, rk.dead, rk.enqueued, rk.meta, rk.finished, rk.config_errors, rk.timeline, rk.stats,
            rk.dead_reasons, rk.dead_counts, rk.attempts, rk.attempt_tokens, rk.spent, cache.key or rk.stats,
            *t.keys()]
    counts = _usage_args(usage)
    packed = pack_sample(codec or await codecs.for_run(redis, rk), sample)
    chars = len(str(sample.get("instruction", "")))
    added, entry_id, finished = await _eval(
        redis, COMMIT_LUA, keys, prompt_id, packed, time.time(), seconds, *t.args(),
        f"{rk.run}:" if indexed else "", int(cache.reused), chars, bytes.fromhex(prompt_id) if indexed else b"",
        *counts,
    )
    return bool(added), (entry_id.decode() if entry_id else None), bool(finished)


async def dead_letter(redis: Redis, rk: RunKeys, prompt_id: str, letter: dict[str, Any],
                      training: Training | None = None, codec: Codec | None = None) -> tuple[bool, bool]:
    """(written, run finished now). Not written when the prompt is already done."""
    t = training or Training("", "")
    letter = {**letter, "time": time.time()}
    packed = (codec or await codecs.for_run(redis, rk)).pack(letter)
    written, finished = await _eval(redis, DEAD_LUA, _finish_keys(rk) + [rk.dead_reasons, rk.dead_counts] + t.keys(),
                                    prompt_id, packed, time.time(), str(letter.get("reason", "?")), *t.args())
    return bool(written), bool(finished)


async def mark_finished_if_complete(redis: Redis, rk: RunKeys, training: Training | None = None,
                                    summary: bytes = b"") -> bool:
    """Finish the run if every prompt is done or dead (and write its training job); with `summary`, first
    mark the enqueue complete, in the same script."""
    t = training or Training("", "")
    return bool(await _eval(redis, COMPLETE_LUA, _finish_keys(rk) + t.keys(), time.time(), *t.args(), summary))


# ---------------------------------------------------------------- reading samples and dead letters back
# Every read of a stored sample or letter goes through `sample_json` / `jsonl_line` / `_letter` with a reader from
# `codecs.readers`, which picks each value's dictionary by the id its frame names: packed frames (with or without a
# dictionary) and old uncompressed JSON alike. A value whose dictionary Redis lacks raises DictionaryMissing.


def sample_json(codec: Any, fields: dict[bytes, bytes]) -> bytes:
    """The JSON of a stream entry's sample (without its stream id)."""
    return codec.json(fields[b"s"])


def decode_sample(codec: Any, fields: dict[bytes, bytes]) -> dict[str, Any]:
    return orjson.loads(sample_json(codec, fields))


def jsonl_line(codec: Any, entry_id: bytes | str, fields: dict[bytes, bytes]) -> bytes:
    """One JSONL line from a stream entry; the entry id goes into the trace (it is the file's checkpoint)."""
    sid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    raw = fields[b"s"]
    text = sample_json(codec, fields)
    if codecs.is_frame(raw) and not text.endswith(b"{}}"):  # pack_sample: the trace is last, without a stream id
        return b"%s,\"stream_id\":\"%s\"}}\n" % (text[:-2], sid.encode())
    sample = orjson.loads(text)
    sample["hegelion_trace"]["stream_id"] = sid
    return orjson.dumps(sample) + b"\n"


async def decode_entries(redis: Redis, rk: RunKeys, entries: list[tuple[bytes, dict[bytes, bytes]]],
                         unreadable: list[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Stream entries as (id, sample), in the order given. An entry packed with a dictionary Redis lacks is left out
    and its id added to `unreadable` (given), or raises DictionaryMissing (not given)."""
    reader = await codecs.readers(redis, rk, [f[b"s"] for _, f in entries])
    out = []
    for eid, fields in entries:
        try:
            out.append((eid.decode(), decode_sample(reader, fields)))
        except codecs.DictionaryMissing:
            if unreadable is None:
                raise
            unreadable.append(eid.decode())
    return out


# A cache entry whose sample is gone (its run purged): removed, unless a commit replaced it meanwhile.
FORGET_LUA = "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end"


async def cached_sample(redis: Redis, prefix: str, cache_key: str, prompt_id: str
                        ) -> tuple[str, str, dict[str, Any]] | None:
    """(its run, its stream id, the sample) of the answer the cache holds for `prompt_id`, or None: no entry, a run
    purged since (the entry goes), a sample that cannot be read now. A miss is never an error."""
    if not _SHA256.match(prompt_id):
        return None
    digest = bytes.fromhex(prompt_id)
    pointer = await redis.hget(cache_key, digest)
    if pointer is None:
        return None
    run, _, sid = pointer.decode().partition(":")
    try:
        src = RunKeys(prefix, run)
        entries = await redis.xrange(src.results, min=sid, max=sid, count=1)
    except Exception:  # noqa: BLE001 -- a pointer that names no run or no entry: a miss
        entries = []
    found = await decode_entries(redis, src, entries, []) if entries else []
    if not found:
        if not entries:
            await _eval(redis, FORGET_LUA, [cache_key], digest, pointer)
        return None
    sample = found[0][1]
    if (sample.get("hegelion_trace") or {}).get("prompt_id") != prompt_id:
        await _eval(redis, FORGET_LUA, [cache_key], digest, pointer)
        return None
    return run, sid, sample


async def newest(redis: Redis, rk: RunKeys, n: int) -> list[tuple[str, dict[str, Any]]]:
    """The run's `n` newest samples, oldest first, with their stream ids (unreadable ones left out)."""
    return await decode_entries(redis, rk, list(reversed(await redis.xrevrange(rk.results, count=n))), [])


async def follow(redis: Redis, rk: RunKeys, after: str, block_ms: int = 2000) -> list[tuple[str, dict[str, Any]]]:
    """Samples committed after stream id `after` ('$': from now), waiting up to `block_ms` for the first."""
    got = await redis.xread({rk.results: after}, block=block_ms, count=100)
    return await decode_entries(redis, rk, [e for _, items in got or [] for e in items], [])


def _letter(codec: Any, pid: bytes, raw: bytes) -> dict[str, Any]:
    """A letter (reason `?` when it cannot be read: packed with a lost dictionary, or not JSON at all; shown and
    counted, never dropped)."""
    try:
        letter = codec.unpack(raw)
    except (codecs.DictionaryMissing, orjson.JSONDecodeError, zstandard.ZstdError) as e:
        letter = {"error": f"unreadable letter: {e}", "record": None}
    if not isinstance(letter, dict):
        letter = {"error": "unreadable letter", "record": None}
    if not isinstance(letter.get("reason"), str):
        letter["reason"] = "?"
    return {**letter, "prompt_id": pid.decode()}


def newest_sync(client: Any, rk: RunKeys, n: int) -> list[dict[str, Any]]:
    """The run's `n` newest samples, newest first, through a synchronous client (harnesses, tests)."""
    codec = codecs.for_run_sync(client, rk)
    return [decode_sample(codec, fields) for _, fields in client.xrevrange(rk.results, count=n)]


def enqueued_ids_sync(client: Any, rk: RunKeys) -> set[str]:
    """The run's enqueued prompt ids in hex (the set keeps digests; a run enqueued before that, hex)."""
    return {m.hex() if len(m) == 32 else m.decode() for m in client.smembers(rk.enqueued)}


def dead_letters_sync(client: Any, rk: RunKeys) -> dict[str, dict[str, Any]]:
    """Every dead letter by prompt id, through a synchronous client (harnesses, tests: small runs)."""
    codec = codecs.for_run_sync(client, rk)
    return {k.decode(): codec.unpack(v) for k, v in client.hgetall(rk.dead).items()}


async def _entries(redis: Redis, rk: RunKeys, after: str | None = None, count: int = XRANGE_COUNT
                   ) -> AsyncIterator[list[tuple[bytes, dict[bytes, bytes]]]]:
    """The run's raw stream entries after stream id `after` (all: None), in order, `count` at a time."""
    start = f"({after}" if after else "-"
    while entries := await redis.xrange(rk.results, min=start, max="+", count=count):
        yield entries
        start = f"({entries[-1][0].decode()}"


async def iter_samples(redis: Redis, rk: RunKeys, count: int = XRANGE_COUNT, unreadable: list[str] | None = None
                       ) -> AsyncIterator[list[tuple[str, dict[str, Any]]]]:
    """Every sample of the run in stream order, `count` (stream id, sample) at a time (the export's reading path);
    with `unreadable` given, entries packed with a dictionary Redis lacks are left out and their ids listed there."""
    async for entries in _entries(redis, rk, count=count):
        yield await decode_entries(redis, rk, entries, unreadable)


async def dead_letters(redis: Redis, rk: RunKeys, limit: int | None = None) -> list[dict[str, Any]]:
    """The run's dead letters (each with its `prompt_id`), newest first; `limit` reads no more than about
    that many from Redis (a letter keeps up to 64 KiB of raw teacher output). A whole run's letters are read in
    batches: `dead_letter_batches`."""
    items: list[tuple[bytes, bytes]] = []
    async for batch in dead_letter_batches(redis, rk, limit or LETTER_BATCH):
        items += batch
        if limit is not None and len(items) >= limit:
            break
    letters = await letters_of(redis, rk, items[:limit])
    return sorted(letters, key=lambda x: x.get("time") or 0, reverse=True)


async def dead_letter_batches(redis: Redis, rk: RunKeys, count: int = LETTER_BATCH):
    """The run's dead letters as raw (prompt id, letter) pairs, about `count` a call (HSCAN: Redis is never held
    for the whole hash); a letter is listed once even when the hash changes meanwhile."""
    seen: set[bytes] = set()
    cursor = 0
    while True:
        cursor, got = await redis.hscan(rk.dead, cursor, count=count)
        batch = [(k, v) for k, v in got.items() if k not in seen]
        seen.update(k for k, _ in batch)
        if batch:
            yield batch
        if cursor == 0:
            return


async def letters_of(redis: Redis, rk: RunKeys, batch: list[tuple[bytes, bytes]]) -> list[dict[str, Any]]:
    """A batch of `dead_letter_batches`, decoded (a letter packed with a dictionary Redis lacks: reason unreadable)."""
    reader = await codecs.readers(redis, rk, [v for _, v in batch])
    return [_letter(reader, k, v) for k, v in batch]


# Letters written before the reason index or the counts existed, indexed once (status.collect does it when the counts
# do not cover every letter): first each letter without a reason gets one, then the counts are made again from the
# index in one script (atomic against the scripts that write and remove letters, which keep both).
INDEX_LETTERS_LUA = """
local dead, reasons = KEYS[1], KEYS[2]
for i = 1, #ARGV, 2 do
  if redis.call('HEXISTS', dead, ARGV[i]) == 1 then redis.call('HSETNX', reasons, ARGV[i], ARGV[i + 1]) end
end
return 1
"""
RECOUNT_LUA = """
local reasons, counts = KEYS[1], KEYS[2]
local by = {}
for _, r in ipairs(redis.call('HVALS', reasons)) do by[r] = (by[r] or 0) + 1 end
redis.call('DEL', counts)
for r, n in pairs(by) do redis.call('HSET', counts, r, n) end
return 1
"""


async def index_dead_letters(redis: Redis, rk: RunKeys) -> None:
    """The one-off migration of a run whose dead letters predate their reason index and counts."""
    async for batch in dead_letter_batches(redis, rk):
        known = await redis.hmget(rk.dead_reasons, [pid for pid, _ in batch])
        todo = [item for item, reason in zip(batch, known) if reason is None]
        if todo:
            args = [x for letter in await letters_of(redis, rk, todo)
                    for x in (letter["prompt_id"], str(letter.get("reason") or "?"))]
            await _eval(redis, INDEX_LETTERS_LUA, [rk.dead, rk.dead_reasons], *args)
    await _eval(redis, RECOUNT_LUA, [rk.dead_reasons, rk.dead_counts])


# ---------------------------------------------------------------- JSONL materialisation


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


@dataclass
class Written:
    """What a flush or an export wrote: lines, and the samples it could not read (packed with a dictionary Redis
    lacks): their stream ids and the dictionaries."""

    lines: int = 0
    unreadable: list[str] = field(default_factory=list)
    missing: set[int] = field(default_factory=set)

    def warning(self) -> str:
        """One line for the user, or '' when every sample was read."""
        if not self.unreadable:
            return ""
        ids = ", ".join(self.unreadable[:5]) + (", …" if len(self.unreadable) > 5 else "")
        return (f"{len(self.unreadable)} samples could not be read (zstd dictionary "
                f"{', '.join(map(str, sorted(self.missing)))} missing from Redis; stream ids {ids}): restore it with "
                "`hegelion-queue restore-dictionary FILE`, then export again")


async def _append_from(redis: Redis, rk: RunKeys, f: BinaryIO, after: str | None, stop_at_unreadable: bool) -> Written:
    """Append every stream entry after `after` to f. An entry packed with a dictionary Redis lacks is skipped and
    reported (export), or ends the append before it (flush: the file's checkpoint stays before it, so the next flush
    writes it once the dictionary is back). A batch is written in a thread while the next is read from Redis and
    unpacked (a file write releases the GIL): the disk's time hides behind the rest."""
    out = Written()
    writing: asyncio.Future | None = None
    try:
        async for entries in _entries(redis, rk, after):
            reader = await codecs.readers(redis, rk, [fields[b"s"] for _, fields in entries])
            lines = []
            for eid, fields in entries:
                try:
                    lines.append(jsonl_line(reader, eid, fields))
                except codecs.DictionaryMissing as e:
                    out.unreadable.append(eid.decode())
                    out.missing.add(e.dict_id)
                    if stop_at_unreadable:
                        break
            if writing is not None:
                await writing
            writing = asyncio.ensure_future(asyncio.to_thread(f.write, b"".join(lines)))
            out.lines += len(lines)
            if stop_at_unreadable and out.unreadable:
                break
    finally:  # never leave a write running into a file the caller is about to close
        if writing is not None:
            await writing
    f.flush()
    os.fsync(f.fileno())
    return out


_process_locks: dict[str, asyncio.Lock] = {}


async def flush(redis: Redis, rk: RunKeys, path: Path) -> Written:
    """Bring the JSONL at `path` up to date with the run's stream; safe with any number of writers. It stops before
    a sample it cannot read (logged loudly; the next flush goes on from there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _process_locks.setdefault(str(path), asyncio.Lock())  # flock does not order tasks of one process
    async with lock:
        with open(path, "a+b") as f:
            await asyncio.to_thread(fcntl.flock, f.fileno(), fcntl.LOCK_EX)
            try:
                after = repair_tail(f)
                if after and not await redis.xrange(rk.results, min=after, max=after, count=1):
                    _set_aside(f, path)
                    after = None
                written = await _append_from(redis, rk, f, after, stop_at_unreadable=True)
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    if written.unreadable:
        logger.error("%s: stopped before %s", path, written.warning())
    return written


def _set_aside(f: BinaryIO, path: Path) -> None:
    """The stream no longer holds the file's checkpoint (`purge` and the same run name again, a restore or
    failover that lost entries): appending after it would duplicate or skip samples. The file is copied aside
    and rebuilt from the stream, which is the source of truth."""
    aside = path.with_name(f"{path.name}.stale-{int(time.time() * 1000)}")
    f.seek(0)
    with open(aside, "wb") as out:
        shutil.copyfileobj(f, out)
    f.truncate(0)
    logger.warning("%s: its last line is not in the run's stream; kept as %s and rebuilt from Redis", path, aside)


async def export(redis: Redis, rk: RunKeys, path: Path) -> Written:
    """Write the run's complete, ordered, duplicate-free JSONL to `path` (atomically replaced), and the run's zstd
    dictionary next to it (`<path>.zdict-<id>`: what restores it to a Redis that lost it). A sample that cannot be
    read is left out and reported (`Written.warning`), never the whole export."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            written = await _append_from(redis, rk, f, None, stop_at_unreadable=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    codecs.write_dictionaries(await codecs.stored_dictionaries(redis, rk), path)
    return written
