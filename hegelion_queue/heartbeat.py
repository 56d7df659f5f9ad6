"""Each worker process keeps a key with a short TTL saying who it is and what it runs, so `status` on any
host can list live workers, their hosts and their in-flight jobs (arq's health-check key is one per queue)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import Any

import orjson
from redis.asyncio import Redis

from . import keys

logger = logging.getLogger("hegelion.heartbeat")

INTERVAL = 5.0
MIN_INTERVAL = 1.0  # a change is published within a second, never more often (no cost per job)
TTL_MS = 15_000  # three missed beats: the worker is gone


class Heartbeat:
    def __init__(self, redis: Redis, prefix: str, kind: str, queue: str):
        self.redis, self.kind, self.queue = redis, kind, queue
        self.host, self.pid = socket.gethostname(), os.getpid()
        # containers scaled from one image can share a host name and pid 1: a random instance id keeps keys apart
        self.key = keys.worker_heartbeat(prefix, self.host, self.pid, uuid.uuid4().hex[:8])
        self.started = time.time()
        self.running: set[str] = set()
        self.done = 0
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def job_started(self, job_id: str) -> None:
        self.running.add(job_id)
        self.changed.set()

    def job_ended(self, job_id: str, done: bool) -> None:
        self.running.discard(job_id)
        self.done += done
        self.changed.set()

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop())

    def state(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "kind": self.kind, "queue": self.queue,
                "started_at": self.started, "running": sorted(self.running), "done": self.done, "at": time.time()}

    async def beat(self) -> None:
        await self.redis.set(self.key, orjson.dumps(self.state()), px=TTL_MS)

    async def _loop(self) -> None:
        while True:
            self.changed.clear()
            try:
                await self.beat()
            except Exception as e:  # Redis away for a moment: the next beat tries again
                logger.warning("heartbeat failed: %s", e)
            await asyncio.sleep(MIN_INTERVAL)
            try:
                await asyncio.wait_for(self.changed.wait(), INTERVAL - MIN_INTERVAL)
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        try:
            await self.redis.delete(self.key)
        except Exception:
            pass


async def live_workers(redis: Redis, prefix: str) -> list[dict[str, Any]]:
    found = [k async for k in redis.scan_iter(match=keys.worker_heartbeats(prefix), count=10_000)]
    values = await redis.mget(found) if found else []
    return sorted((orjson.loads(v) for v in values if v), key=lambda w: (w["host"], w["pid"]))
