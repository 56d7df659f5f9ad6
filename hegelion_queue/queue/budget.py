"""A run's spending budget: limits on the teacher tokens, calls and seconds it may spend.

The limits live in the run's `budget` hash; what was spent lives in its `stats` hash (calls are counted by the
script that counts each attempt, tokens and seconds by the commit). The check is in that same attempt script
(scripts.BEGIN_LUA, with SPENT_LUA below), so it costs no extra round trip and holds for every worker on every
host: once a limit is reached no call starts, and the run pauses with reason `budget`.

Tokens and seconds are known only when a call ends, so a call is started while what was spent so far is under
the limit: calls already in flight may take the total past it, by at most their own usage each. Calls are
counted when they start, so a calls budget is never passed.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from redis.asyncio import Redis

from . import cost
from ..errors import HegelionError
from ..keys import RunKeys

KINDS = ("tokens", "calls", "teacher_seconds")
FLAGS = {kind: f"--budget-{kind.replace('_', '-')}" for kind in KINDS}
REASON = "budget"  # the breaker's reason while a budget stops the run

# What was spent, from the stats hash, in Lua (BEGIN_LUA) and in Python (`spent`), by one rule: calls are
# `teacher_calls`; seconds `teacher_seconds`; tokens the sum of every usage kind the teacher reported (input,
# cached input, output, …) except a kind that is itself a total. Returns the kind of the first limit reached, or nil.
SPENT_LUA = """
local function budget_reached(limits, stats)
  local h = redis.call('HGETALL', stats)
  local spent = {tokens = 0, calls = 0, teacher_seconds = 0}
  for i = 1, #h, 2 do
    local k = h[i]
    if k == 'teacher_calls' then spent.calls = tonumber(h[i + 1])
    elseif k == 'teacher_seconds' then spent.teacher_seconds = tonumber(h[i + 1])
    elseif string.sub(k, 1, 6) == 'usage_' and not string.find(k, 'total', 7, true) then
      spent.tokens = spent.tokens + tonumber(h[i + 1])
    end
  end
  for i = 1, #limits, 2 do
    local kind, limit = limits[i], tonumber(limits[i + 1])
    if spent[kind] ~= nil and limit ~= nil and spent[kind] >= limit then
      return kind
    end
  end
  return nil
end
"""


def tokens_of(usage: Mapping[str, Any] | None) -> int | None:
    """Tokens of one call's usage, by SPENT_LUA's rule (None: the teacher reported none)."""
    counts = [v for k, v in (usage or {}).items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and "total" not in k]
    return int(sum(counts)) if counts else None


def spent(stats: Mapping[str, str]) -> dict[str, float]:
    """What the run spent, from its stats hash (decoded), by SPENT_LUA's rule."""
    return {"tokens": tokens_of(cost.usage(stats)) or 0, "calls": int(float(stats.get("teacher_calls", 0))),
            "teacher_seconds": round(float(stats.get("teacher_seconds", 0)), 1)}


def view(limits: Mapping[str, str], stats: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Each kind's limit (None: none), spent and left (None without a limit): what status shows."""
    out = {}
    for kind, used in spent(stats).items():
        limit = _number(kind, limits.get(kind)) if limits.get(kind) is not None else None
        out[kind] = {"limit": limit, "spent": used, "left": None if limit is None else max(0, limit - used)}
    return out


def reached(v: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The first limit reached in a `view`, in words, or None."""
    for kind in KINDS:
        if v[kind]["limit"] is not None and v[kind]["spent"] >= v[kind]["limit"]:
            return f"{kind} {fmt(v[kind]['spent'])} of {fmt(v[kind]['limit'])} spent"
    return None


def fmt(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def _number(kind: str, raw: Any) -> int | float:
    return float(raw) if kind == "teacher_seconds" else int(float(raw))


def parse_limit(kind: str, raw: str | None) -> int | float | None:
    """A limit given on the command line: a positive number (whole, but for seconds), or a one-line error."""
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    whole = kind != "teacher_seconds"
    if not math.isfinite(value) or value <= 0 or (whole and value != int(value)):
        what = "a positive whole number" if whole else "a positive number of seconds"
        raise HegelionError(f"{FLAGS[kind]} takes {what}, not {raw!r}")
    return int(value) if whole else value


def parse_limits(given: Mapping[str, str | None]) -> dict[str, int | float]:
    """The limits given as flags ({kind: text or None}), checked before anything is written."""
    return {k: v for k, v in ((k, parse_limit(k, given.get(k))) for k in KINDS) if v is not None}


def with_settings(given: Mapping[str, int | float], settings: Any) -> dict[str, int | float]:
    """Flags win; a kind without one takes HEGELION_BUDGET_<KIND> when that is set."""
    return {k: v for k in KINDS if (v := given.get(k, getattr(settings, f"budget_{k}"))) is not None}


async def set_limits(redis: Redis, rk: RunKeys, limits: Mapping[str, int | float]) -> None:
    if limits:
        await redis.hset(rk.budget, mapping={k: repr(v) for k, v in limits.items()})


async def read(redis: Redis, rk: RunKeys) -> dict[str, dict[str, Any]]:
    async with redis.pipeline(transaction=False) as p:
        p.hgetall(rk.budget).hgetall(rk.stats)
        limits, stats = await p.execute()
    return view(_text(limits), _text(stats))


def _text(h: Mapping[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in h.items()}


def line(v: Mapping[str, Mapping[str, Any]]) -> str:
    """One line for `status`: each limit with spent and left; '' when the run has none."""
    parts = [f"{kind.replace('_', ' ')} {fmt(d['spent'])} of {fmt(d['limit'])} spent, {fmt(d['left'])} left"
             for kind, d in v.items() if d["limit"] is not None]
    return "; ".join(parts)
