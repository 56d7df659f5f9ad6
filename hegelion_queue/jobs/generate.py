"""The generator job: one prompt -> one committed sample or one dead letter, never both, never neither.

arq's own retry limit and timeout would drop a job silently, so this job never lets an exception reach
arq: transient trouble becomes `Retry(defer=backoff)`, and our own attempt counter (in Redis, so it
survives a SIGKILLed worker) decides when a prompt is dead-lettered instead.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from arq import Retry
from arq.connections import ArqRedis

import zstandard

from ..queue import codec as codecs
from ..queue import jsonl, store
from .. import keys
from ..queue.connection import PACKED
from ..dialectic import DialecticError, build_sample, parse
from ..queue.heartbeat import Heartbeat
from ..queue.ratelimit import Busy, Limiter
from ..settings import Settings, get_settings
from ..teacher.presets import ConfigError, Teacher, TeacherError, TransientError
from .training_job import training

logger = logging.getLogger("hegelion.generate")

RAW_CAP = 64 * 1024  # characters of raw teacher output kept in a dead letter
CLEANUP_GRACE = 5.0  # seconds a cancelled job may take to give back its attempt
_RATE_LIMITED = re.compile(r"\b429\b|rate.?limit|too many requests", re.IGNORECASE)


def backoff(attempt: int, settings: Settings) -> float:
    """Exponential backoff with jitter, capped: spreads retries of a rate-limited run apart."""
    return min(settings.retry_cap, settings.retry_base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


class Flusher:
    """Coalesces JSONL flushes of one worker process: commits only ask, one task writes."""

    def __init__(self, redis: ArqRedis, settings: Settings):
        self.redis, self.settings = redis, settings
        self.runs: set[str] = set()
        self.pending: set[str] = set()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def request(self, run: str) -> None:
        if not self.settings.local_jsonl:
            return
        self.runs.add(run)
        self.pending.add(run)
        self.wake.set()
        if self.task is None:
            self.task = asyncio.create_task(self._loop())

    async def _flush(self, run: str) -> None:
        rk = keys.RunKeys(self.settings.key_prefix, run)
        try:
            await jsonl.flush(self.redis, rk, self.settings.jsonl_path(run))
        except Exception:  # the stream keeps the sample; the next flush or `export` writes it
            logger.exception("flush of run %s failed", run)

    async def _loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            runs, self.pending = self.pending, set()
            for run in runs:
                await self._flush(run)

    async def close(self) -> None:
        if self.task:
            self.task.cancel()
        for run in self.runs:
            await self._flush(run)


async def startup(ctx: dict[str, Any]) -> None:
    settings = get_settings()
    redis = ctx["redis"]
    home = Path(tempfile.mkdtemp(prefix="hegelion-worker-"))  # this worker's kimi share dir and scratch dir
    ctx.update(settings=settings, home=home, teacher=Teacher(settings, home), flusher=Flusher(redis, settings))
    ctx["limiter"] = Limiter(redis, settings, slot_ttl=settings.job_timeout())
    ctx["heartbeat"] = Heartbeat(redis, settings.key_prefix, "generator", settings.queue_name)
    ctx["heartbeat"].start()
    ctx["host"] = socket.gethostname()
    logger.info("generator worker ready: teacher=%s model=%s", settings.teacher, ctx["teacher"].model)


async def shutdown(ctx: dict[str, Any]) -> None:
    if "heartbeat" in ctx:
        await ctx["heartbeat"].stop()
    if "flusher" in ctx:
        await ctx["flusher"].close()
    if "teacher" in ctx:
        await ctx["teacher"].close()
    if "home" in ctx:
        shutil.rmtree(ctx["home"], ignore_errors=True)


def on_run_finished(settings: Settings, run: str) -> None:
    """Logged only: the script that finished the run wrote its training job too (store.py)."""
    train = f"; training job on {settings.train_queue_name}" if settings.auto_train else ""
    logger.info("run %s finished%s", run, train)


async def _dead(ctx: dict[str, Any], rk: keys.RunKeys, pid: str, letter: dict[str, Any],
                codec: codecs.Codec | None = None) -> str:
    settings: Settings = ctx["settings"]
    written, finished = await store.dead_letter(ctx["redis"], rk, pid, letter, training(settings, rk.run), codec)
    if written:
        logger.warning("dead letter %s:%s: %s: %s", rk.run, pid[:12], letter["reason"], letter.get("error", ""))
    if finished:
        on_run_finished(settings, rk.run)
    return f"dead: {letter['reason']}"


def _record_fields(record: Any) -> tuple[str, str, str]:
    if not isinstance(record, dict):
        raise ValueError(f"job argument is {type(record).__name__}, not a prompt record")
    run, pid, prompt = record.get("run"), record.get("prompt_id"), record.get("prompt")
    if not all(isinstance(v, str) and v for v in (run, pid, prompt)):
        raise ValueError("prompt record lacks run, prompt_id or prompt")
    if not keys.RUN_NAME.match(run):
        raise ValueError(f"invalid run name {run!r}")
    return run, pid, prompt


async def reject_payload(ctx: dict[str, Any], preview: Any = "", error: Any = "", *_: Any, **__: Any) -> str:
    """A job whose payload could not be read (not JSON, not an arq job): dead-letter, never execute."""
    preview, error = str(preview)[:2048], str(error)[:2048] or "payload names reject_payload"
    run, _, pid = ctx["job_id"].rpartition(":")
    rk = keys.RunKeys(ctx["settings"].key_prefix, run if keys.RUN_NAME.match(run) else "unknown")
    letter = {"reason": "bad_payload", "error": error, "attempts": 0, "raw_output": preview, "record": None}
    return await _dead(ctx, rk, pid or ctx["job_id"], letter)


async def generate(ctx: dict[str, Any], record: Any = None, *_: Any, **__: Any) -> str:
    """arq job. An unexpected error (Redis away mid-commit, a bug) is retried, never handed to arq,
    which would drop the job; the attempt counter still bounds it."""
    settings: Settings = ctx["settings"]
    task = asyncio.ensure_future(_generate(ctx, record))
    try:
        await asyncio.wait({task}, timeout=settings.job_deadline())
    except asyncio.CancelledError:  # arq cancels (SIGTERM drain, abort): let the job give back its attempt
        task.cancel()
        await asyncio.wait({task}, timeout=CLEANUP_GRACE)
        _let_go(task)
        raise
    if not task.done():
        # Our own deadline, inside arq's job timeout, which arq treats as final (it deletes the job). The job
        # is cancelled but not waited for: its clean-up may wait for Redis far longer than arq would.
        ctx["deadline_passed"] = True
        task.cancel()
        _let_go(task)
        logger.warning("job %s: over its deadline of %.0fs (Redis unreachable?); retrying", ctx.get("job_id"),
                       settings.job_deadline())
        raise Retry(defer=backoff(1, settings))
    try:
        return task.result()
    except Retry:
        raise
    except Exception as e:
        logger.exception("job %s: unexpected error; retrying", ctx.get("job_id"))
        raise Retry(defer=backoff(1, ctx["settings"])) from e


_abandoned: set[asyncio.Task[str]] = set()  # jobs past their deadline, still unwinding


def _let_go(task: asyncio.Task[str]) -> None:
    """Keep a cancelled job that is still unwinding referenced until it ends, without waiting for it."""
    if not task.done():
        _abandoned.add(task)
        task.add_done_callback(_forget)


def _forget(task: asyncio.Task[str]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: it was logged as the deadline, not as "never retrieved"


async def _unpack(ctx: dict[str, Any], packed: bytes) -> tuple[dict[str, Any], codecs.Codec]:
    """A packed job's prompt record (its prompt id and run from the job id) and the codec it was packed with."""
    run, pid = keys.split_job_id(ctx["job_id"])
    if not keys.RUN_NAME.match(run):
        raise ValueError(f"invalid run name {run!r}")
    codec = await codecs.of_frame(ctx["redis"], keys.RunKeys(ctx["settings"].key_prefix, run), packed)
    record = codec.unpack(packed)
    if not isinstance(record, dict):
        raise ValueError(f"packed job holds {type(record).__name__}, not a prompt record")
    return {"prompt_id": pid, **record}, codec


async def _dictionary_missing(ctx: dict[str, Any], packed: bytes, e: codecs.DictionaryMissing) -> str:
    """A job packed with a dictionary Redis lost: a dead letter that keeps the packed payload (`retry-failed` revives
    it once the dictionary is back), and the run pauses, loudly: every job of the run would fail the same way."""
    settings: Settings = ctx["settings"]
    run, pid = keys.split_job_id(ctx["job_id"])
    rk = keys.RunKeys(settings.key_prefix, run)
    why = f"dictionary {e.dict_id} missing: {e}"
    if not await store.pause(ctx["redis"], rk, why, "dictionary"):
        raise Retry(defer=settings.breaker_recheck)  # paused already: rest with the others until it is back
    logger.error("run %s paused: %s -- then `hegelion-queue retry-failed --run %s`", run, e, run)
    letter = {"reason": "dictionary", "error": str(e), "attempts": 0, "record": None,
              "packed": base64.b64encode(packed).decode(), "dictionary": e.dict_id}
    return await _dead(ctx, rk, pid, letter, codecs.PLAIN)


async def _generate(ctx: dict[str, Any], record: Any) -> str:
    settings: Settings = ctx["settings"]
    codec = None
    packed = record.get(PACKED) if isinstance(record, dict) else None
    try:
        if isinstance(packed, bytes):
            record, codec = await _unpack(ctx, packed)
        run, pid, prompt = _record_fields(record)
    except codecs.DictionaryMissing as e:
        return await _dictionary_missing(ctx, packed, e)
    except (ValueError, zstandard.ZstdError) as e:
        return await reject_payload(ctx, repr(record)[:2048], str(e))
    rk = keys.RunKeys(settings.key_prefix, run)
    cache = _cache_key(settings, record)
    limiter: Limiter = ctx["limiter"]
    if cache or limiter.enabled:
        # A paused run or a finished prompt takes no free copy from the cache (even those wait for resume) and no
        # turn of the limit that every worker shares.
        state = await store.begin_attempt(ctx["redis"], rk, pid, peek=True)
        if state < 0:
            raise Retry(defer=settings.breaker_recheck)
        if state == 0:
            return "already done"
    if cache and (reused := await _reuse(ctx, rk, record, pid, cache, codec)):
        return reused

    slot = None
    if limiter.enabled:
        try:  # the turn before the attempt: waiting for the rate limit must not use up an attempt
            slot = await limiter.acquire(max_wait=settings.rate_wait())
        except Busy as e:
            raise Retry(defer=e.wait) from e
    try:
        return await _attempt(ctx, rk, record, pid, prompt, codec)
    finally:
        await limiter.release(slot)


def _cache_key(settings: Settings, record: dict[str, Any]) -> str:
    """The answer cache this job reuses from and indexes its sample in ('': none: HEGELION_CACHE=0, `--no-cache`)."""
    teacher = record.get("cache")
    return keys.answer_cache(settings.key_prefix, teacher) if settings.cache and isinstance(teacher, str) else ""


async def _reuse(ctx: dict[str, Any], rk: keys.RunKeys, record: dict[str, Any], pid: str, cache: str,
                 codec: codecs.Codec | None) -> str | None:
    """An answer the same teacher configuration already gave for this prompt, in any run, committed into this one
    through the same exactly-once commit: no teacher call, no budget spent. None: a miss (no entry, or a run purged).
    The caller has checked that the run is not paused and the prompt not done."""
    settings: Settings = ctx["settings"]
    redis: ArqRedis = ctx["redis"]
    found = await store.cached_sample(redis, settings.key_prefix, cache, pid)
    if found is None:
        return None
    src_run, src_id, sample = found
    trace = {k: v for k, v in sample["hegelion_trace"].items() if k != "stream_id"}
    trace.update(run=rk.run, config_id=record.get("config_id", ""), source=record.get("source", {}), attempts=0,
                 duration_s=0.0, usage={}, host=ctx.get("host", ""), created_at=time.time(),
                 cached={"run": src_run, "stream_id": src_id})
    committed, _, finished = await store.commit(redis, rk, pid, {**sample, "hegelion_trace": trace}, 0.0, None,
                                                training(settings, rk.run), codec, store.CacheEntry(cache, True))
    ctx["flusher"].request(rk.run)
    if finished:
        on_run_finished(settings, rk.run)
    return "reused" if committed else "already done"


async def _attempt(ctx: dict[str, Any], rk: keys.RunKeys, record: dict, pid: str, prompt: str,
                   codec: codecs.Codec | None) -> str:
    settings: Settings = ctx["settings"]
    redis: ArqRedis = ctx["redis"]
    run = rk.run
    token = uuid.uuid4().hex  # names this attempt: a re-sent begin counts once, a cancelled one is given back
    attempt = await store.begin_attempt(redis, rk, pid, token)
    if attempt < 0:  # the run is paused: look again later, spend nothing
        raise Retry(defer=settings.breaker_recheck)
    if attempt == 0:  # finished elsewhere: no paid call for a done prompt
        return "already done"
    base = {"record": record, "attempts": attempt}
    if attempt > settings.max_tries:  # earlier attempts died with their worker (SIGKILL, OOM)
        return await _dead(ctx, rk, pid, {**base, "reason": "worker_lost", "error": "no attempt finished"}, codec)

    teacher: Teacher = ctx["teacher"]
    limiter: Limiter = ctx["limiter"]
    beat: Heartbeat = ctx["heartbeat"]
    beat.job_started(ctx["job_id"])
    t0 = time.monotonic()
    answer = None
    try:
        answer = await teacher.ask(prompt)
        d = parse(answer.text, settings.min_section_chars)
    except asyncio.CancelledError:
        if not ctx.get("deadline_passed"):  # a drain or an abort: this attempt reached no outcome
            with contextlib.suppress(Exception):
                await asyncio.wait_for(store.refund_attempt(redis, rk, pid, token), CLEANUP_GRACE)
        raise
    except (ConfigError, TransientError, DialecticError) as e:
        # the call ended without a sample, but it spent what it spent: the budget counts it (once per attempt)
        usage = answer.usage if answer is not None else getattr(e, "usage", {})
        await store.spend(redis, rk, pid, token, time.monotonic() - t0, usage)
        if isinstance(e, ConfigError):
            await _open_breaker_if_repeated(redis, settings, rk, pid, str(e))
            return await _dead(ctx, rk, pid, {**base, **_error_fields(e), "reason": "config"}, codec)
        if isinstance(e, TransientError) and _RATE_LIMITED.search(f"{e} {e.output[-2000:]}"):
            await limiter.rate_limited()
        reason = "invalid_answer" if isinstance(e, DialecticError) else "teacher"
        if attempt >= settings.max_tries:
            fields = _error_fields(e) if isinstance(e, TeacherError) else {"error": str(e),
                                                                          "raw_output": answer.text[:RAW_CAP]}
            return await _dead(ctx, rk, pid, {**base, **fields, "reason": reason}, codec)
        await redis.hincrby(rk.stats, "retries", 1)
        delay = backoff(attempt, settings)
        logger.info("%s:%s attempt %d: %s; retry in %.0fs", run, pid[:12], attempt, e, delay)
        raise Retry(defer=delay) from e
    finally:
        beat.job_ended(ctx["job_id"], done=sys.exc_info()[0] is None)

    if limiter.enabled:
        await limiter.succeeded()
    duration = time.monotonic() - t0
    trace = {
        "reasoning": answer.reasoning,
        "prompt_id": pid,
        "run": run,
        "source": record.get("source", {}),
        "teacher": {"preset": settings.teacher, "model": teacher.model},
        "config_id": record.get("config_id", ""),  # the run's configuration that made it (provenance.py)
        "attempts": attempt,
        "duration_s": round(duration, 3),
        "usage": answer.usage,
        "host": ctx.get("host", ""),
        "created_at": time.time(),
    }
    committed, _, finished = await store.commit(redis, rk, pid, build_sample(prompt, d, trace), duration, answer.usage,
                                                training(settings, run), codec,
                                                store.CacheEntry(_cache_key(settings, record)))
    ctx["flusher"].request(run)  # also after "already done": that may be our own commit, its reply lost
    if finished:
        on_run_finished(settings, run)
    return "committed" if committed else "already done"


def _error_fields(e: TeacherError) -> dict[str, Any]:
    return {"error": str(e), "stderr_tail": e.stderr_tail, "raw_output": e.output[:RAW_CAP]}


async def _open_breaker_if_repeated(redis: ArqRedis, settings: Settings, rk: keys.RunKeys, pid: str, why: str) -> None:
    n, opened = await store.config_error(redis, rk, pid, why, settings.breaker_threshold)
    if opened:
        logger.error(
            "run %s paused after %d configuration errors in a row: %s -- fix it, then `hegelion-queue resume --run %s`",
            rk.run, n, why, rk.run,
        )
