"""Where a run stands, read from Redis only, so it works on any host."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import orjson
from redis.asyncio import Redis

from . import budget, cost, store
from .. import keys
from .heartbeat import live_workers
from ..keys import RunKeys
from ..settings import Settings

RATE_WINDOW = 60  # minutes of samples/min history in `per_minute` (the dashboard's chart)

# Everything `status` shows about one run, in one call: a fleet of runs is one pipeline of these (a plain pipeline
# of ten commands a run spent five times the client CPU). O(1) in the run's size: dead letters are counted by reason
# from `dead_counts` (reason -> count), which the scripts writing and removing letters keep, and never from the
# letters themselves (a letter keeps up to 64 KiB of raw output, and may be packed). Letters the counts do not cover
# (written before they existed) show as reason `?` until `collect` has indexed them, once (store.index_dead_letters).
# The timeline keeps one field per minute of the run's life: only the last RATE_WINDOW are read.
RUN_LUA = """
local enqueued, done, results, dead, stats, breaker, meta, timeline, finished, train, dead_counts, budget = unpack(KEYS)
local reasons = redis.call('HGETALL', dead_counts)
local counted = 0
for i = 2, #reasons, 2 do counted = counted + tonumber(reasons[i]) end
local uncounted = redis.call('HLEN', dead) - counted
if uncounted ~= 0 then reasons[#reasons + 1] = '?'; reasons[#reasons + 1] = uncounted end
local minutes = {}
for m = tonumber(ARGV[1]), tonumber(ARGV[2]) do minutes[#minutes + 1] = m end
local per_minute = redis.call('HMGET', timeline, unpack(minutes))
for i = 1, #per_minute do per_minute[i] = tonumber(per_minute[i]) or 0 end
return {redis.call('SCARD', enqueued), redis.call('SCARD', done), redis.call('XLEN', results), reasons,
        redis.call('HGETALL', stats), redis.call('HGETALL', breaker),
        redis.call('HMGET', meta, 'enqueue_complete', 'output'), per_minute, redis.call('GET', finished),
        redis.call('HGETALL', train), redis.call('HGETALL', budget)}
"""


def _num(v: Any) -> float:
    return float(v) if v is not None else 0.0


def _text(h: dict[bytes, bytes] | list[bytes]) -> dict[str, str]:
    """A hash as text, from HGETALL (a dict) or from a script (a flat list of fields and values)."""
    items = h.items() if isinstance(h, dict) else zip(h[::2], h[1::2])
    return {k.decode(): v.decode() for k, v in items}


async def collect(redis: Redis, settings: Settings, rk: RunKeys) -> dict[str, Any]:
    """`status --json` of one run."""
    return (await collect_many(redis, settings, [rk]))[0]


async def collect_many(redis: Redis, settings: Settings, rks: list[RunKeys],
                       workers: list[dict[str, Any]] | None = None, reindexed: bool = False) -> list[dict[str, Any]]:
    """`collect` of several runs in one round trip (and one heartbeat scan, or the `workers` given)."""
    now = time.time()
    now_ms = int(now * 1000)
    minute = int(now // 60)
    script = redis.register_script(RUN_LUA)
    async with redis.pipeline(transaction=False) as p:
        p.zcard(settings.queue_name).zcount(settings.queue_name, "-inf", now_ms)
        p.get(f"{settings.queue_name}:health-check")
        for rk in rks:
            run_keys = [rk.enqueued, rk.done, rk.results, rk.dead, rk.stats, rk.breaker, rk.meta, rk.timeline,
                        rk.finished, rk.train, rk.dead_counts, rk.budget]
            await script(keys=run_keys, args=[minute - RATE_WINDOW + 1, minute], client=p)
        got = await p.execute()
    if workers is None:
        workers = await live_workers(redis, settings.key_prefix)
    queue_len, due, health = got[:3]
    shared = {
        "queue": {"name": settings.queue_name, "total": queue_len, "due": due, "deferred": queue_len - due},
        "health_check": health.decode() if health else None,
        "workers": [{k: w[k] for k in ("host", "pid", "kind", "done")} | {"running": len(w["running"])}
                    for w in workers],
    }
    running = Counter(keys.job_run(j) for w in workers for j in w["running"])
    out = [_summary(rk, state, shared, running[rk.run], settings) for rk, state in zip(rks, got[3:])]
    stale = [rk for rk, st in zip(rks, out) if "?" in st["dead_by_reason"]]
    if stale and not reindexed:  # letters from before the counts: indexed once, then counted like the rest
        for rk in stale:
            await store.index_dead_letters(redis, rk)
        return await collect_many(redis, settings, rks, workers, reindexed=True)
    return out


def _summary(rk: RunKeys, got: list[Any], shared: dict[str, Any], in_progress: int,
             settings: Settings) -> dict[str, Any]:
    enqueued, done, stream_len, reasons, stats, breaker, (complete, output), timeline, finished, train, limits = got
    dead_by_reason = {reasons[i].decode(): int(reasons[i + 1]) for i in range(0, len(reasons), 2)}
    dead = sum(dead_by_reason.values())
    series = timeline
    last5 = sum(series[-5:]) / 5
    last60 = sum(series) / 60
    pending = max(0, enqueued - done - dead)
    rate = last5 or last60
    dec = _text(stats)
    return {
        "run": rk.run,
        "enqueued": enqueued,
        "done": done,
        "dead": dead,
        "dead_by_reason": dead_by_reason,
        "pending": pending,
        "results_stream": stream_len,
        "queue": shared["queue"],
        "retries": int(_num(dec.get("retries"))),
        "teacher_seconds": round(_num(dec.get("teacher_seconds")), 1),
        "usage": (usage := cost.usage(dec)),
        # every teacher call that ended, committed or not, across pauses and retries; reused answers count zero
        "tokens": (counts := cost.tokens(usage)),
        "cost": cost.money(counts, settings),
        "cached": int(_num(dec.get("cached"))),
        "per_sample": {"teacher_seconds": round(_num(dec.get("teacher_seconds")) / done, 2) if done else None,
                       **{k: round(v / done, 1) for k, v in usage.items() if done}},
        "samples_per_min_5m": round(last5, 2),
        "samples_per_min_60m": round(last60, 2),
        "per_minute": series,  # samples committed in each of the last RATE_WINDOW minutes, oldest first
        "eta_s": round(pending / rate * 60) if rate and pending else None,
        "paused": _text(breaker) or None,
        "finished": finished is not None,
        "enqueue_complete": complete == b"1",
        "output": (output or b"").decode(),
        "health_check": shared["health_check"],
        "workers": shared["workers"],
        "in_progress": in_progress,
        "training": _training(train),
        "budget": budget.view(_text(limits), dec),  # each kind: limit (None: none), spent, left
    }


async def run_names(redis: Redis, prefix: str) -> list[str]:
    """Every run in the index (a name that is not a valid run name is passed over)."""
    names = (m.decode() for m in await redis.smembers(keys.runs_index(prefix)))
    return sorted(n for n in names if keys.RUN_NAME.match(n))


async def fleet(redis: Redis, settings: Settings) -> dict[str, Any]:
    """Every run's `collect`, the live workers and both queues: what the dashboard and /metrics show."""
    workers = await live_workers(redis, settings.key_prefix)
    runs = await collect_many(redis, settings, [RunKeys(settings.key_prefix, n)
                                                for n in await run_names(redis, settings.key_prefix)], workers)
    now_ms = int(time.time() * 1000)
    async with redis.pipeline(transaction=False) as p:
        for q in (settings.queue_name, settings.train_queue_name):
            p.zcard(q).zcount(q, "-inf", now_ms)
        depth = await p.execute()
    queues = [{"name": q, "total": depth[2 * i], "due": depth[2 * i + 1], "deferred": depth[2 * i] - depth[2 * i + 1]}
              for i, q in enumerate((settings.queue_name, settings.train_queue_name))]
    return {"at": time.time(), "runs": runs, "workers": workers, "queues": queues}


async def training(redis: Redis, rk: RunKeys) -> dict[str, Any]:
    """The run's training: progress fields, the trainer's summary and eval (parsed), and its metric rows."""
    async with redis.pipeline(transaction=False) as p:
        p.hgetall(rk.train).lrange(rk.train_metrics, 0, -1)
        state, rows = await p.execute()
    fields = _text(state)
    summary = _json(fields.pop("summary", None))
    ev = _json(fields.pop("eval", None)) or (summary or {}).get("eval")
    metrics = [r for r in (_json(x) for x in rows) if isinstance(r, dict)]
    return {"state": fields, "summary": summary if isinstance(summary, dict) else None,
            "eval": ev if isinstance(ev, dict) else None, "metrics": metrics}


def _json(raw: Any) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None


def _training(raw: dict[bytes, bytes]) -> dict[str, Any] | None:
    """The run's `train` hash, its JSON fields (summary, eval) parsed."""
    out: dict[str, Any] = _text(raw)
    for key in ("summary", "eval"):
        if key in out:
            out[key] = _json(out[key])
    return out or None


def _short(v: Any) -> str:
    try:
        return f"{float(v):.4g}"
    except ValueError:
        return str(v)


def paused_why(d: dict[str, Any]) -> str:
    """Why the run is paused and what to do, in one line."""
    why = d["paused"].get("reason")
    if why == budget.REASON:
        kind = d["paused"].get("budget", "tokens")
        return (f"budget ({budget.reached(d['budget']) or kind + ' limit reached'}) -- raise it: "
                f"`hegelion-queue resume --run {d['run']} {budget.FLAGS.get(kind, '--budget-tokens')} N`")
    return f"{why} -- fix it, then `hegelion-queue resume --run {d['run']}`"


def duration(seconds: Any) -> str:
    """A duration in a table cell or a status line: 2h05m, 3m04s ("—" for none)."""
    try:
        s = int(float(seconds))
    except (TypeError, ValueError, OverflowError):
        return "—"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def render(d: dict[str, Any]) -> str:
    q = d["queue"]
    lines = [
        f"run {d['run']}: {d['done']} done, {d['dead']} dead, {d['pending']} pending of {d['enqueued']} enqueued"
        + (" (finished)" if d["finished"] else ""),
        f"queue {q['name']}: {q['total']} jobs ({q['due']} due now, {q['deferred']} deferred); retries {d['retries']}",
        f"rate: {d['samples_per_min_5m']}/min (5 min), {d['samples_per_min_60m']}/min (60 min)"
        + (f"; ETA {duration(d['eta_s'])}" if d["eta_s"] else ""),
    ]
    tokens, cached = d.get("tokens") or {"input": 0, "output": 0}, d.get("cached", 0)
    if d["teacher_seconds"] or tokens["input"] or cached:
        lines.append("spent: " + cost.line(tokens, d.get("cost"), d["teacher_seconds"])
                     + (f"; {cached} answers reused from the answer cache (no call)" if cached else ""))
    if d["done"]:
        usage = ", ".join(f"{k} {v:g}" for k, v in d["usage"].items())
        lines.append(f"teacher time {d['teacher_seconds']}s ({d['per_sample']['teacher_seconds']}s per sample)"
                     + (f"; tokens: {usage}" if usage else ""))
    if d["dead_by_reason"]:
        lines.append("dead letters: " + ", ".join(f"{k} {v}" for k, v in sorted(d["dead_by_reason"].items())))
    if spending := budget.line(d["budget"]):
        lines.append(f"budget: {spending}")
    if d["paused"]:
        lines.append(f"PAUSED: {paused_why(d)}")
    hosts: dict[str, list[dict[str, Any]]] = {}
    for w in d["workers"]:
        hosts.setdefault(w["host"], []).append(w)
    lines.append(f"workers alive: {len(d['workers'])}; in progress for this run: {d['in_progress']}")
    for host, ws in sorted(hosts.items()):
        lines.append(f"  {host}: " + ", ".join(f"{w['kind']} pid {w['pid']} ({w['running']} running, {w['done']} done)"
                                               for w in ws))
    if d["health_check"]:
        lines.append(f"arq health: {d['health_check']}")
    if (t := d["training"]) is not None:
        shown = ("state", "phase", "step", "iters", "loss", "S", "lambda", "eta_s", "device", "error", "adapter_path")
        lines.append("training: " + ", ".join(f"{k}={_short(t[k])}" for k in shown if k in t))
        if t.get("eval"):
            from ..training.eval_summary import summary_line

            lines.append(f"eval: {summary_line(t['eval'])}")
    if d["output"]:
        lines.append(f"output: {d['output']}")
    return "\n".join(lines)
