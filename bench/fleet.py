"""A fleet in Redis for the dashboard benchmark: runs part way through (queued jobs, samples, dead letters with
raw output, a per-minute timeline, training progress and curves) and live worker heartbeats, written directly."""

from __future__ import annotations

import hashlib
import time

import orjson
import redis as redis_sync

from hegelion_queue import keys
from hegelion_queue.queue.codec import PLAIN
from hegelion_queue.jobs.producer import job_payload
from hegelion_queue.queue.store import pack_sample

PER_RUN = {"enqueued": 500, "done": 400, "dead": 10, "stream": 20, "metric_rows": 100}
RAW = "The teacher answered without the sections it was asked for. " * 64  # ~4 KiB of raw output per letter


def populate(client: redis_sync.Redis, runs: int, workers: int, prefix: str = "hegelion",
             queue: str = "hegelion:queue") -> None:
    now = time.time()
    minute = int(now // 60)
    for i in range(runs):
        run = f"bench-{i:03d}"
        rk = keys.RunKeys(prefix, run)
        ids = [hashlib.sha256(f"{run}/{j}".encode()).hexdigest() for j in range(PER_RUN["enqueued"])]
        done, dead = ids[: PER_RUN["done"]], ids[PER_RUN["done"] : PER_RUN["done"] + PER_RUN["dead"]]
        queued = ids[PER_RUN["done"] + PER_RUN["dead"] :]
        p = client.pipeline(transaction=False)
        p.sadd(keys.runs_index(prefix), run)
        p.sadd(rk.enqueued, *ids).sadd(rk.done, *done)
        p.hset(rk.meta, mapping={"enqueue_complete": 1, "dataset": "bench", "output": f"artifacts/data/{run}.jsonl"})
        p.hset(rk.stats, mapping={"retries": 37, "teacher_seconds": 4000.5, "usage_input_other": 48000,
                                  "usage_output": 32000})
        p.hset(rk.timeline, mapping={minute - m: 5 + (m * 7 + i) % 11 for m in range(90)})
        for pid in dead:
            letter = {"record": {"prompt_id": pid, "run": run, "prompt": f"prompt {pid[:8]}"}, "attempts": 5,
                      "error": "no THESIS section", "raw_output": RAW, "reason": "invalid_answer", "time": now}
            p.hset(rk.dead, pid, PLAIN.pack(letter)).hset(rk.dead_reasons, pid, letter["reason"])
            p.hincrby(rk.dead_counts, letter["reason"], 1)
        for pid in done[: PER_RUN["stream"]]:
            trace = {"thesis": "T" * 200, "antithesis": "A" * 200, "synthesis": "S" * 200, "final_answer": "F" * 800,
                     "prompt_id": pid, "run": run, "attempts": 1, "duration_s": 3.2, "usage": {"output": 80}}
            p.xadd(rk.results, {"s": pack_sample(PLAIN, {"instruction": f"prompt {pid[:8]}", "output": "…",
                                                         "hegelion_trace": trace})})
        for pid in queued:
            jid = keys.job_id(run, pid)
            p.set(keys.arq_job(jid), job_payload(PLAIN, {"run": run, "prompt": "x" * 300}), px=86_400_000)
            p.zadd(queue, {jid: int(now * 1000) + (0 if int(pid, 16) % 4 else 60_000)})
        if i % 2 == 0:
            p.hset(rk.train, mapping={"state": "running", "step": 120, "iters": 300, "loss": 0.8, "S": 0.012,
                                      "lambda": 2.5, "tokens_per_s": 800, "eta_s": 300})
            p.rpush(rk.train_metrics, *[orjson.dumps({"step": s, "loss": 6 / (1 + s), "val_loss": None, "S": 0.01,
                                                      "lambda": 1 + s / 10, "tokens_per_s": 800})
                                        for s in range(PER_RUN["metric_rows"])])
        p.execute()
    p = client.pipeline(transaction=False)
    for w in range(workers):
        host, pid = f"gen-{w % 5}", 1000 + w
        running = [keys.job_id(f"bench-{(w + k) % max(runs, 1):03d}", hashlib.sha256(f"{w}/{k}".encode()).hexdigest())
                   for k in range(8)]
        state = {"host": host, "pid": pid, "kind": "generator", "queue": queue, "started_at": now - 3600,
                 "running": running, "done": 1234, "at": now}
        key = keys.worker_heartbeat(prefix, host, pid, f"{w:08x}")
        p.set(key, orjson.dumps(state), px=600_000).zadd(keys.worker_index(prefix), {key: int(now * 1000) + 600_000})
    p.execute()
