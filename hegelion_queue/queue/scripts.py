"""Every Lua script that changes a run's state, and the one way to run them.

redis-py sends a command again when its reply was lost (after Redis ran it), so each of these must be idempotent
under a re-send: claims, attempts, spends and limiter turns carry tokens, sets are used where a count would double,
and the commit is SADD-guarded. The scripts are sent by their SHA (EVALSHA), loaded on first use.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from .budget import SPENT_LUA


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

# A pause that names its kind (a missing dictionary): reason, kind and time in one step, so a worker that dies
# between them cannot leave a breaker without the kind that lets the run wake by itself. 0: it was open already.
PAUSE_LUA = """
if redis.call('HSETNX', KEYS[1], 'reason', ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'kind', ARGV[2], 'since', ARGV[3])
return 1
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

# A cache entry whose sample is gone (its run purged): removed, unless a commit replaced it meanwhile.
FORGET_LUA = "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end"


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



_scripts: dict[str, Any] = {}


async def run(redis: Redis, script: str, keys: list[str], *args: Any) -> Any:
    """EVALSHA of a script (loaded on first use), not EVAL: the hot path sends no script text."""
    if script not in _scripts:
        _scripts[script] = redis.register_script(script)
    return await _scripts[script](keys=keys, args=list(args), client=redis)
