"""The trainer job: export a finished run from Redis, convert it, train an SCU LoRA adapter, report progress.

It may run on a host that never saw the generator's JSONL: everything comes from the run's stream.
Progress (step, loss, S, λ, tokens/s, ETA) and the measured duration (after the first steps) go to the run's `train`
hash so `status` and `make run` show them anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from arq.connections import ArqRedis
from ..queue import jsonl, store
from .. import keys
from ..queue.connection import sync_client
from ..errors import HegelionError
from ..settings import Settings, get_settings

logger = logging.getLogger("hegelion.training")


def train_args(settings: Settings, run: str, overrides: dict[str, Any] | None = None):
    """TrainArgs for a run: the adapter under HEGELION_ADAPTERS_DIR/<run>, the model from the settings."""
    from ..training.args import TrainArgs, check_options

    try:
        configured = orjson.loads(settings.train_options) if settings.train_options else {}
    except orjson.JSONDecodeError as e:
        raise HegelionError(f"HEGELION_TRAIN_OPTIONS is not JSON ({e})") from e
    extra = {k: v for k, v in {**configured, **(overrides or {})}.items() if v is not None}
    check_options(extra)
    base = {"model": settings.train_model, "adapter_path": str(settings.adapters_dir / run)}
    return TrainArgs(**{**base, **extra})


class TrainingStopped(BaseException):
    """Raised in the training thread by the progress hook once its job was cancelled (SIGTERM, abort): a
    BaseException, so the trainer's `except Exception` around the hook lets it through and mlx-lm's loop
    ends at the next report instead of training on while arq hands the job to another trainer."""


def progress_writer(settings: Settings, rk: keys.RunKeys, iters: int, stop: threading.Event | None = None):
    """on_progress hook for train.run_training (runs in the training thread, so a sync client; Sentinel and TLS
    as the workers reach Redis): the latest row in the run's `train` hash, every row of the SCU run in its
    `train:metrics` list (the curves, for any host). Once `stop` is set it ends the training instead."""
    client = sync_client(settings)
    client.delete(rk.train_metrics)  # a new training: new curves
    t0 = time.monotonic()

    def write(row: dict[str, Any]) -> None:
        if stop is not None and stop.is_set():
            raise TrainingStopped
        step = row["step"]
        elapsed = time.monotonic() - t0
        eta = elapsed / max(step, 1) * max(iters - step, 0)
        fields = {k: row[k] for k in ("step", "loss", "S", "lambda", "tokens_per_s") if row.get(k) is not None}
        phase = "plain twin" if row.get("twin") else "scu"
        with client.pipeline(transaction=False) as p:
            p.hset(rk.train, mapping={**fields, "iters": iters, "eta_s": round(eta), "state": "running", "phase": phase})
            if not row.get("twin"):  # the metrics.jsonl row as it is
                p.rpush(rk.train_metrics, orjson.dumps({k: v for k, v in row.items() if k != "iters"}))
            p.execute()

    return write


def estimate_writer(settings: Settings, rk: keys.RunKeys, also=None):
    """on_estimate hook for train.run_training: the measured duration into the run's `train` hash (field `estimate`,
    JSON) for `make run`, `status` and the dashboard on any host; then `also` (e.g. the CLI's printer)."""
    client = sync_client(settings)

    def write(estimate) -> None:
        client.hset(rk.train, mapping={"estimate": orjson.dumps(estimate.as_dict()), "device": estimate.device})
        if also is not None:
            also(estimate)

    return write


async def train_run(ctx: dict[str, Any], run: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """arq job (trainer queue). Does nothing for a run already trained; a second trigger while this one is
    queued or running is refused by arq itself (the job id is derived from the run)."""
    settings: Settings = ctx.get("settings") or get_settings()
    redis: ArqRedis = ctx["redis"]
    rk = keys.RunKeys(settings.key_prefix, run)
    if (await redis.hget(rk.train, "state")) == b"done" and not (overrides or {}).get("force"):
        return {"run": run, "skipped": "already trained"}
    overrides = {k: v for k, v in (overrides or {}).items() if k != "force"}
    args = train_args(settings, run, overrides)
    source = Path(args.adapter_path) / "source.jsonl"
    written = await jsonl.export(redis, rk, source)
    if written.unreadable:
        logger.error("run %s: training without %s", run, written.warning())
    n = written.lines
    if n == 0:
        raise HegelionError(f"run {run} has no committed samples to train on")
    await redis.hdel(rk.train, "estimate")  # an earlier training's
    await redis.hset(rk.train, mapping={"state": "running", "samples": n, "started_at": time.time(),
                                        "host": ctx.get("host", ""), "adapter_path": args.adapter_path})
    from ..training.train import run_training

    stop = threading.Event()
    fitting = asyncio.ensure_future(asyncio.to_thread(run_training, source, args,
                                                      progress_writer(settings, rk, args.iters, stop),
                                                      estimate_writer(settings, rk, ctx.get("on_estimate"))))
    try:
        summary = await asyncio.shield(fitting)
    except asyncio.CancelledError:
        # arq queues the job again as soon as this coroutine ends: the thread must have stopped by then, or two
        # trainers would write one adapter folder (it resumes from the last checkpoint next time)
        stop.set()
        await asyncio.wait({fitting})
        with contextlib.suppress(Exception):
            await asyncio.wait_for(redis.hset(rk.train, "state", "interrupted"), 5)
        logger.warning("training run %s interrupted at a report step; it resumes from its last checkpoint", run)
        raise
    except Exception as e:
        await redis.hset(rk.train, mapping={"state": "failed", "error": str(e)[:2000]})
        logger.exception("training run %s failed", run)
        raise
    done = {"state": "done", "summary": orjson.dumps(summary), "finished_at": time.time()}
    if summary.get("eval"):
        done["eval"] = orjson.dumps(summary["eval"])
    await redis.hset(rk.train, mapping=done)
    logger.info("run %s trained: %s", run, args.adapter_path)
    return summary


def training(settings: Settings, run: str, overrides: dict | None = None, auto: bool = True) -> store.Training:
    """The run's training job as arq's payload (what `enqueue_job` would write); an empty one when `auto` and
    HEGELION_AUTO_TRAIN=0. The run's finish writes it in the same Lua script (store.py)."""
    payload = b""
    if settings.auto_train or not auto:
        payload = orjson.dumps({"t": None, "f": keys.TRAIN_FUNCTION, "a": [run, overrides or {}], "k": {},
                                "et": int(time.time() * 1000)})
    return store.Training(settings.train_queue_name, keys.train_job_id(run), payload)


async def enqueue_training(redis: ArqRedis, settings: Settings, run: str, overrides: dict | None = None) -> bool:
    """One training job per run: refused while one is queued or running or its result is kept. Its job key
    has no TTL: a training job waits for a trainer however long that takes."""
    return await store.enqueue_training(redis, training(settings, run, overrides, auto=False))
