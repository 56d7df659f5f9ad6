"""One rate limit for every worker on every host, enforced in Redis by one Lua call per teacher call.

Requests per minute use GCRA (a token bucket kept as one timestamp): requests are spaced evenly, with a
burst of one interval, so the observed rate stays at the limit instead of bursting a minute's worth. In-flight
slots are a zset of expiry times (Redis' clock), so a slot whose worker died frees itself. A 429 from the teacher sets a
run-wide backoff that doubles while 429s keep coming.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid

from redis.asyncio import Redis

from ..keys import LimitKeys
from ..settings import Settings

logger = logging.getLogger("hegelion.ratelimit")

# Time is Redis' own (TIME), not each host's clock: a host whose clock is off must neither take turns early
# nor block everyone else. The slot is recorded with every granted turn, so a re-sent call (its reply was
# lost) finds its turn granted instead of taking a second one.
ACQUIRE_LUA = """
local cell, in_flight, backoff = KEYS[1], KEYS[2], KEYS[3]
local interval, max_in_flight, slot, slot_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZSCORE', in_flight, slot) then return 0 end
local wait = redis.call('PTTL', backoff)
if wait > 0 then return wait end
redis.call('ZREMRANGEBYSCORE', in_flight, '-inf', now)
if max_in_flight > 0 and redis.call('ZCARD', in_flight) >= max_in_flight then
  local first = redis.call('ZRANGE', in_flight, 0, 0, 'WITHSCORES')
  return math.min(1000, math.max(10, tonumber(first[2]) - now))
end
if interval > 0 then
  local tat = tonumber(redis.call('GET', cell) or now)
  if tat < now then tat = now end
  if tat - now > interval then return tat - now - interval end
  redis.call('SET', cell, tat + interval, 'PX', math.ceil(interval * 2 + 60000))
end
redis.call('ZADD', in_flight, now + slot_ttl, slot)
return 0
"""
RELEASE_WAIT = 2.0  # seconds release() may take; a slot that cannot be given back expires by itself


class Busy(Exception):
    """No turn within the wait a job may spend here: the job is deferred instead (no attempt used)."""

    def __init__(self, wait: float):
        super().__init__(f"rate limit: next turn in {wait:.1f}s")
        self.wait = wait


class Limiter:
    """acquire() before a teacher call, release() after; a no-op when no limit is set."""

    def __init__(self, redis: Redis, settings: Settings, slot_ttl: float):
        self.redis, self.settings, self.keys = redis, settings, LimitKeys(settings.key_prefix)
        self.interval_ms = 60_000 / settings.rate_limit if settings.rate_limit else 0
        self.slot_ttl_ms = int(slot_ttl * 1000)
        self.enabled = bool(settings.rate_limit or settings.max_in_flight)
        self.script = redis.register_script(ACQUIRE_LUA)

    async def acquire(self, max_wait: float) -> str | None:
        """Wait for a turn, up to max_wait seconds (else Busy); returns the in-flight slot to release
        (None when there is no limit)."""
        if not self.enabled:
            return None
        slot = uuid.uuid4().hex
        k = self.keys
        deadline = time.monotonic() + max_wait
        args = [self.interval_ms, self.settings.max_in_flight, slot, self.slot_ttl_ms]
        while True:
            wait_ms = await self.script(keys=[k.cell, k.in_flight, k.backoff], args=args)
            if wait_ms <= 0:
                return slot
            wait = wait_ms / 1000 * random.uniform(1.0, 1.1)
            if time.monotonic() + wait > deadline:
                raise Busy(wait)
            await asyncio.sleep(wait)

    async def release(self, slot: str | None) -> None:
        """Bounded: a job must not outlive its deadline waiting for Redis to take a slot back."""
        if slot is None:
            return
        try:
            await asyncio.wait_for(self.redis.zrem(self.keys.in_flight, slot), RELEASE_WAIT)
        except Exception as e:  # Redis away: the slot expires with its TTL
            logger.warning("rate-limit slot not released (%s); it expires by itself", e)

    async def rate_limited(self) -> None:
        """The provider said 429: every worker backs off, longer while it keeps saying so."""
        k, s = self.keys, self.settings
        strikes = await self.redis.incr(k.strikes)
        await self.redis.expire(k.strikes, 600)
        delay = min(s.retry_cap, s.retry_base * 2 ** (strikes - 1))
        await self.redis.set(k.backoff, strikes, px=int(delay * 1000), nx=True)

    async def succeeded(self) -> None:
        await self.redis.delete(self.keys.strikes)
