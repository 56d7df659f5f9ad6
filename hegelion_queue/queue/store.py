"""Exactly-once results: a run's attempts, commits and dead letters (through `scripts`), and reading them back.

A sample is committed by one script: SADD the run's done-set and, only if that added it, XADD the sample to the run's
results stream, which is the source of truth (`jsonl` copies it to a file). Every read of a stored sample or letter
goes through a reader from `codec.readers`, which picks each value's dictionary by the id its frame names.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import orjson
import zstandard
from redis.asyncio import Redis

from . import codec as codecs
from . import scripts
from .codec import Codec
from ..keys import PROMPT_ID, RunKeys, arq_job, arq_result

logger = logging.getLogger("hegelion.store")

XRANGE_COUNT = 2000
LETTER_BATCH = 500
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


async def begin_attempt(redis: Redis, rk: RunKeys, prompt_id: str, token: str = "", peek: bool = False) -> int:
    """-1: the run is paused (now, if its budget is spent); 0: the prompt is done; else the number of this attempt
    (`token` names it, so a re-sent call counts once). peek: only look (1 = go ahead), count nothing."""
    keys = [rk.breaker, rk.done, rk.attempts, rk.attempt_tokens, rk.budget, rk.stats]
    return await scripts.run(redis, scripts.BEGIN_LUA, keys, prompt_id, token, int(peek), time.time())


def _usage_args(usage: dict[str, Any] | None) -> list[Any]:
    return [x for k, v in (usage or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            for x in (k, v)]


async def spend(redis: Redis, rk: RunKeys, prompt_id: str, token: str, seconds: float,
                usage: dict[str, Any] | None = None) -> bool:
    """Count the tokens and seconds of attempt `token`'s call, which ended without a commit (once: False on a
    re-send)."""
    return bool(await scripts.run(redis, scripts.SPEND_LUA, [rk.stats, rk.spent], prompt_id, token, seconds, *_usage_args(usage)))


async def pause(redis: Redis, rk: RunKeys, reason: str, kind: str) -> bool:
    """Open the run's breaker (it pauses: its jobs rest until `resume`); False when it was open already."""
    return bool(await scripts.run(redis, scripts.PAUSE_LUA, [rk.breaker], reason, kind, time.time()))


async def refund_attempt(redis: Redis, rk: RunKeys, prompt_id: str, token: str) -> bool:
    return bool(await scripts.run(redis, scripts.REFUND_LUA, [rk.attempts, rk.attempt_tokens], prompt_id, token))


async def enqueue_training(redis: Redis, training: Training) -> bool:
    """Write the training job (no TTL) unless it is queued, running or its result is kept."""
    return bool(await scripts.run(redis, scripts.ENQUEUE_TRAINING_LUA, training.keys(), *training.args()))


async def config_error(redis: Redis, rk: RunKeys, prompt_id: str, why: str, threshold: int) -> tuple[int, bool]:
    """(configuration errors in a row, the breaker opened now)."""
    n, opened = await scripts.run(redis, scripts.CONFIG_ERROR_LUA, [rk.config_errors, rk.breaker], prompt_id, why, threshold,
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
    indexed = bool(cache.key) and PROMPT_ID.match(prompt_id) is not None
    keys = [rk.done, rk.results, rk.dead, rk.enqueued, rk.meta, rk.finished, rk.config_errors, rk.timeline, rk.stats,
            rk.dead_reasons, rk.dead_counts, rk.attempts, rk.attempt_tokens, rk.spent, cache.key or rk.stats,
            *t.keys()]
    counts = _usage_args(usage)
    packed = pack_sample(codec or await codecs.for_run(redis, rk), sample)
    chars = len(str(sample.get("instruction", "")))
    added, entry_id, finished = await scripts.run(
        redis, scripts.COMMIT_LUA, keys, prompt_id, packed, time.time(), seconds, *t.args(),
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
    written, finished = await scripts.run(redis, scripts.DEAD_LUA, _finish_keys(rk) + [rk.dead_reasons, rk.dead_counts] + t.keys(),
                                    prompt_id, packed, time.time(), str(letter.get("reason", "?")), *t.args())
    return bool(written), bool(finished)


async def mark_finished_if_complete(redis: Redis, rk: RunKeys, training: Training | None = None,
                                    summary: bytes = b"") -> bool:
    """Finish the run if every prompt is done or dead (and write its training job); with `summary`, first
    mark the enqueue complete, in the same script."""
    t = training or Training("", "")
    return bool(await scripts.run(redis, scripts.COMPLETE_LUA, _finish_keys(rk) + t.keys(), time.time(), *t.args(), summary))


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




async def cached_sample(redis: Redis, prefix: str, cache_key: str, prompt_id: str
                        ) -> tuple[str, str, dict[str, Any]] | None:
    """(its run, its stream id, the sample) of the answer the cache holds for `prompt_id`, or None: no entry, a run
    purged since (the entry goes), a sample that cannot be read now. A miss is never an error."""
    if not PROMPT_ID.match(prompt_id):
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
            await scripts.run(redis, scripts.FORGET_LUA, [cache_key], digest, pointer)
        return None
    sample = found[0][1]
    if (sample.get("hegelion_trace") or {}).get("prompt_id") != prompt_id:
        await scripts.run(redis, scripts.FORGET_LUA, [cache_key], digest, pointer)
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


async def index_dead_letters(redis: Redis, rk: RunKeys) -> None:
    """The one-off migration of a run whose dead letters predate their reason index and counts."""
    async for batch in dead_letter_batches(redis, rk):
        known = await redis.hmget(rk.dead_reasons, [pid for pid, _ in batch])
        todo = [item for item, reason in zip(batch, known) if reason is None]
        if todo:
            args = [x for letter in await letters_of(redis, rk, todo)
                    for x in (letter["prompt_id"], str(letter.get("reason") or "?"))]
            await scripts.run(redis, scripts.INDEX_LETTERS_LUA, [rk.dead, rk.dead_reasons], *args)
    await scripts.run(redis, scripts.RECOUNT_LUA, [rk.dead_reasons, rk.dead_counts])
