"""Faster job pickup for arq: claim up to the free slot count in one Lua call, and poll again the moment a
job finishes.

Stock arq reads the queue head each poll and checks ids one at a time (about four round trips each); running
jobs stay in the queue, so with 64 jobs in flight every poll walks 64 busy ids before it finds a free one,
and a freed slot waits for the next poll. Here one script skips busy ids inside Redis and claims due ones
by `SET arq:in-progress:<id> NX PX` (the key arq itself uses, with arq's TTL, so stock workers and ours
exclude each other), and a finished job wakes the poll loop. Everything after the claim is arq's own
`run_job`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from .connection import Worker, install_worker

logger = logging.getLogger("hegelion.pickup")

SCAN_CHUNK = 200
SCAN_MAX = 5000  # ids looked at per claim at most (busy or deferred ones are skipped in Redis)

# Returns the offset the next claim starts at, then the claimed ids and scores. A claim that looked at
# SCAN_MAX busy ids without filling its slots hands the next one the offset where it stopped, so due jobs
# behind more than SCAN_MAX running ones are reached too. The claim's token is the in-progress key's value: a
# re-sent call (its reply was lost) finds its own claims and returns them again instead of nothing.
CLAIM_LUA = """
local queue, prefix = KEYS[1], ARGV[1]
local now, want, ttl_ms, scan_max, chunk = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]),
  tonumber(ARGV[6])
local token, offset = ARGV[7], tonumber(ARGV[8])
local claimed = {0}
local scanned = 0
while #claimed < 2 * want + 1 do
  if scanned >= scan_max then
    claimed[1] = offset
    break
  end
  local ids = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'WITHSCORES', 'LIMIT', offset, chunk)
  if #ids == 0 then break end
  for i = 1, #ids, 2 do
    local key = prefix .. ids[i]
    if redis.call('SET', key, token, 'NX', 'PX', ttl_ms) or redis.call('GET', key) == token then
      claimed[#claimed + 1] = ids[i]
      claimed[#claimed + 1] = ids[i + 1]
      if #claimed >= 2 * want + 1 then break end
    end
  end
  offset = offset + chunk
  scanned = scanned + chunk
end
return claimed
"""


class ClaimingWorker(Worker):
    """arq's Worker with batched claims and wake-on-finish; `poll_delay` is the idle wait."""

    # No __init__ of our own: arq's create_worker passes only the settings that Worker's signature names.
    _wake: asyncio.Event | None = None
    _claim: Any = None
    _offset = 0  # where the next claim starts looking (past SCAN_MAX busy ids)

    async def main(self) -> None:
        self._wake = asyncio.Event()
        self._idle_delay = self.poll_delay_s
        if not self.burst:  # our _poll_iteration waits for a wake or the delay, so arq's loop need not sleep;
            self.poll_delay_s = 0  # burst mode runs arq's own, which does not wait: there arq's loop must
        await super().main()

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        if self._wake is not None:
            self._wake.set()

    async def _claim_jobs(self, want: int) -> list[tuple[str, int]]:
        if self._claim is None:
            self._claim = self.pool.register_script(CLAIM_LUA)
        ttl_ms = int(self.in_progress_timeout_s * 1000)
        args = [in_progress_key_prefix, timestamp_ms(), want, ttl_ms, SCAN_MAX, SCAN_CHUNK, uuid.uuid4().hex,
                self._offset]
        flat = await self._claim(keys=[self.queue_name], args=args)
        self._offset = int(flat[0])
        return [(flat[i].decode(), int(float(flat[i + 1]))) for i in range(1, len(flat), 2)]

    async def _poll_iteration(self) -> None:
        if self.burst or self._wake is None:  # burst mode keeps arq's own bookkeeping
            return await super()._poll_iteration()
        self._wake.clear()
        free = self.max_jobs - self.job_counter
        claimed: list[tuple[str, int]] = []
        if self.allow_pick_jobs and free > 0:
            claimed = await self._claim_jobs(free)
            for job_id, score in claimed:
                await self.sem.acquire()
                self.job_counter += 1
                t = self.loop.create_task(self.run_job(job_id, score))
                t.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
                self.tasks[job_id] = t
        if self.allow_abort_jobs:
            await self._cancel_aborted_jobs()
        for job_id, t in list(self.tasks.items()):
            if t.done():
                del self.tasks[job_id]
                t.result()  # errors in run_job surface here, as in arq
        await self.heart_beat()
        if len(claimed) < free or free <= 0:  # nothing more due, or no slot free: sleep until a job ends
            try:
                await asyncio.wait_for(self._wake.wait(), self._idle_delay)
            except asyncio.TimeoutError:
                pass


def install() -> None:
    """Make `arq <settings>` build ClaimingWorker (see connection.install_worker)."""
    install_worker(ClaimingWorker)
