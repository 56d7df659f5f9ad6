"""Where a run stands, read from Redis only, so it works on any host."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import orjson
from redis.asyncio import Redis

from .heartbeat import live_workers
from .keys import RunKeys
from .settings import Settings


def _num(v: Any) -> float:
    return float(v) if v is not None else 0.0


async def collect(redis: Redis, settings: Settings, rk: RunKeys) -> dict[str, Any]:
    now = time.time()
    now_ms = int(now * 1000)
    async with redis.pipeline(transaction=False) as p:
        p.scard(rk.enqueued).scard(rk.done).hvals(rk.dead).xlen(rk.results)
        p.zcard(settings.queue_name).zcount(settings.queue_name, "-inf", now_ms)
        p.hgetall(rk.stats).hgetall(rk.breaker).hgetall(rk.meta).hgetall(rk.timeline)
        p.get(f"{settings.queue_name}:health-check").get(rk.finished).hgetall(rk.train)
        (enqueued, done, dead_vals, stream_len, queue_len, due, stats, breaker, meta, timeline, health,
         finished, train) = await p.execute()
    workers = await live_workers(redis, settings.key_prefix)
    dead_reasons = Counter(orjson.loads(v).get("reason", "?") for v in dead_vals)
    minute = int(now // 60)
    per_min = {int(k): int(v) for k, v in timeline.items()}
    last5 = sum(per_min.get(m, 0) for m in range(minute - 4, minute + 1)) / 5
    last60 = sum(per_min.get(m, 0) for m in range(minute - 59, minute + 1)) / 60
    pending = max(0, enqueued - done - len(dead_vals))
    rate = last5 or last60
    dec = {k.decode(): v.decode() for k, v in stats.items()}
    return {
        "run": rk.run,
        "enqueued": enqueued,
        "done": done,
        "dead": len(dead_vals),
        "dead_by_reason": dict(dead_reasons),
        "pending": pending,
        "results_stream": stream_len,
        "queue": {"name": settings.queue_name, "total": queue_len, "due": due, "deferred": queue_len - due},
        "retries": int(_num(dec.get("retries"))),
        "teacher_seconds": round(_num(dec.get("teacher_seconds")), 1),
        "usage": {k[6:]: _num(v) for k, v in dec.items() if k.startswith("usage_")},
        "per_sample": {"teacher_seconds": round(_num(dec.get("teacher_seconds")) / done, 2) if done else None,
                       **{k[6:]: round(_num(v) / done, 1) for k, v in dec.items() if k.startswith("usage_") and done}},
        "samples_per_min_5m": round(last5, 2),
        "samples_per_min_60m": round(last60, 2),
        "eta_s": round(pending / rate * 60) if rate and pending else None,
        "paused": {k.decode(): v.decode() for k, v in breaker.items()} or None,
        "finished": finished is not None,
        "enqueue_complete": meta.get(b"enqueue_complete") == b"1",
        "output": meta.get(b"output", b"").decode(),
        "health_check": health.decode() if health else None,
        "workers": [{k: w[k] for k in ("host", "pid", "kind", "done")} | {"running": len(w["running"])}
                    for w in workers],
        "in_progress": sum(len([j for j in w["running"] if j.startswith(f"{rk.run}:")]) for w in workers),
        "training": _training(train),
    }


def _training(raw: dict[bytes, bytes]) -> dict[str, Any] | None:
    """The run's `train` hash, its JSON fields (summary, eval) parsed."""
    if not raw:
        return None
    out: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
    for key in ("summary", "eval"):
        if key in out:
            out[key] = orjson.loads(out[key])
    return out


def _short(v: Any) -> str:
    try:
        return f"{float(v):.4g}"
    except ValueError:
        return str(v)


def render(d: dict[str, Any]) -> str:
    q = d["queue"]
    lines = [
        f"run {d['run']}: {d['done']} done, {d['dead']} dead, {d['pending']} pending of {d['enqueued']} enqueued"
        + (" (finished)" if d["finished"] else ""),
        f"queue {q['name']}: {q['total']} jobs ({q['due']} due now, {q['deferred']} deferred); retries {d['retries']}",
        f"rate: {d['samples_per_min_5m']}/min (5 min), {d['samples_per_min_60m']}/min (60 min)"
        + (f"; ETA {d['eta_s'] // 60}m{d['eta_s'] % 60:02d}s" if d["eta_s"] else ""),
    ]
    if d["done"]:
        usage = ", ".join(f"{k} {v:g}" for k, v in d["usage"].items())
        lines.append(f"teacher time {d['teacher_seconds']}s ({d['per_sample']['teacher_seconds']}s per sample)"
                     + (f"; tokens: {usage}" if usage else ""))
    if d["dead_by_reason"]:
        lines.append("dead letters: " + ", ".join(f"{k} {v}" for k, v in sorted(d["dead_by_reason"].items())))
    if d["paused"]:
        lines.append(f"PAUSED: {d['paused'].get('reason')} -- fix it, then `hegelion-queue resume --run {d['run']}`")
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
        shown = ("state", "phase", "step", "iters", "loss", "S", "lambda", "eta_s", "error", "adapter_path")
        lines.append("training: " + ", ".join(f"{k}={_short(t[k])}" for k in shown if k in t))
        if t.get("eval"):
            from .evaluate import summary_line

            lines.append(f"eval: {summary_line(t['eval'])}")
    if d["output"]:
        lines.append(f"output: {d['output']}")
    return "\n".join(lines)
