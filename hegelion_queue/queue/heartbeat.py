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

from .. import keys

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
        self.index = keys.worker_index(prefix)
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
        await register(self.redis, self.index, self.key, orjson.dumps(self.state()), TTL_MS)

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
            await self.redis.zrem(self.index, self.key)
        except Exception:
            pass


# The heartbeat with its TTL, and its entry in the index of live workers (key -> expiry), in one script; entries
# that expired a minute ago go with it, so the index stays as small as the fleet.
REGISTER_LUA = """
local key, index = KEYS[1], KEYS[2]
local state, ttl_ms = ARGV[1], tonumber(ARGV[2])
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('SET', key, state, 'PX', ttl_ms)
redis.call('ZADD', index, now_ms + ttl_ms, key)
redis.call('ZREMRANGEBYSCORE', index, '-inf', now_ms - 60000)
"""


async def register(redis: Redis, index: str, key: str, state: bytes, ttl_ms: int) -> None:
    await redis.eval(REGISTER_LUA, 2, key, index, state, ttl_ms)


async def live_workers(redis: Redis, prefix: str) -> list[dict[str, Any]]:
    """The workers whose heartbeat is alive, from the index (never a scan of the keyspace, which holds a key per
    queued job)."""
    found = await redis.zrange(keys.worker_index(prefix), 0, -1)
    values = await redis.mget(found) if found else []
    return sorted((orjson.loads(v) for v in values if v), key=lambda w: (w["host"], w["pid"]))
