"""`make bench BENCH_ARGS=--scale`: a million prompts and a million samples, no teacher.

Absolute figures against the targets of issue #17: the producer's peak RSS and time sampling 500 prompts from a 1 M-
and a 5 M-row parquet; Redis used memory per queued 400-character prompt (all 1 M enqueued) and per finished 5 KB
sample (1 M committed by the store's own commit script, as workers commit); `status` time; export throughput and RSS;
the AOF rewrite time; the longest Redis stall while `purge` removes 1 M queued jobs and then 1 M samples, and while
`retry-failed` revives 100 k dead letters. Text is English (tests/english.py), so compression is not flattered.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import orjson

from bench.figure import HQ, Figure
from tests.english import English

RUN = "scale"
ROW_GROUP = 65_536  # the producer holds about two decoded row groups: its peak RSS follows this, not the row count


class Stall:
    """How long Redis was held at a time while a block runs: the longest event its own latency monitor saw
    (`worst`, seconds), and the longest PING round trip from another client (`ping`: that also counts this
    2-core machine's scheduling)."""

    def __init__(self, client: Any):
        self.client, self.ping, self.worst, self._stop = client, 0.0, 0.0, threading.Event()

    def __enter__(self) -> "Stall":
        self.client.config_set("latency-monitor-threshold", 1)
        self.client.execute_command("LATENCY", "RESET")

        def loop() -> None:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                self.client.ping()
                self.ping = max(self.ping, time.perf_counter() - t0)
                time.sleep(0.002)

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self.thread.join()
        events = self.client.execute_command("LATENCY", "LATEST")
        self.worst = max((int(e[3]) for e in events), default=0) / 1000  # [event, time, latest ms, max ms]
        self.events = {(e[0].decode() if isinstance(e[0], bytes) else e[0]): int(e[3]) for e in events}


def write_parquet(path: Path, rows: int, english: English) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists():
        return path
    with pq.ParquetWriter(path, pa.schema([("prompt", pa.string())])) as w:  # row groups of 65,536 rows (~27 MB)
        for lo in range(0, rows, ROW_GROUP):
            w.write_table(pa.table({"prompt": [f"{english.text(410)} (#{i})" for i in range(lo, min(rows, lo + ROW_GROUP))]}))
    return path


def used(client: Any) -> int:
    return client.info("memory")["used_memory"]


def figures(bench: Any) -> list:
    """The scale figures (bench.run.Bench supplies Redis, env and the process timer)."""
    args, r = bench.args, bench.redis.client()
    english = English(seed=17, pool=200_000)
    n = args.scale_rows
    out: list = []

    def fig(name: str, unit: str, target: str, value: float, met: bool | None, **detail: Any) -> None:
        f = Figure(name, unit, target, [value], [detail] if detail else [], met)
        out.append(f)
        print(f"  {name}: {value:.4g} {unit} (target {target})", flush=True)

    bench.flush()
    env = bench.env()
    # 1. the producer: 500 prompts sampled from 1 M and from 5 M rows
    for rows in (n, args.scale_big_rows):
        data = write_parquet(bench.tmp / f"english-{rows}.parquet", rows, english)
        wall, kib = bench.run_timed([*HQ, "enqueue", "--dataset", str(data), "--limit", "500", "--run", f"s{rows}"], env)
        fig(f"producer: sample 500 of {rows:,} rows, peak RSS", "MB", "< 300", kib / 1024, kib / 1024 < 300,
            wall_s=wall, rows_per_s=rows / wall)
        fig(f"producer: sample 500 of {rows:,} rows, wall (linear in rows)", "s", "report", wall, None)
        bench.flush()
    (bench.tmp / f"english-{args.scale_big_rows}.parquet").unlink(missing_ok=True)
    if args.scale_until == "producer":
        return out

    # 2. every row enqueued: Redis per queued prompt
    data = bench.tmp / f"english-{n}.parquet"
    before = used(r)
    wall, kib = bench.run_timed([*HQ, "enqueue", "--dataset", str(data), "--run", RUN], env)
    queued = r.scard(f"hegelion:run:{RUN}:enqueued")
    per_prompt = (used(r) - before) / queued
    fig(f"Redis per queued prompt (~420 characters of English), {queued:,} enqueued", "B", "<= 600", per_prompt,
        per_prompt <= 600, enqueue_s=wall, enqueue_peak_rss_mb=kib / 1024, prompts_per_s=queued / wall)
    t_status = _status_ms(bench, RUN)
    fig(f"status of a run with {queued:,} queued prompts (per call)", "ms", "< 50", t_status, t_status < 50)

    # 3. purge of a run of 1 M queued jobs, keeping its dictionary for the samples below
    zdict = r.get(f"hegelion:run:{RUN}:zdict")
    with Stall(bench.redis.client()) as stall:
        wall, _ = bench.run_timed([*HQ, "purge", "--run", RUN, "--yes"], env)
    fig(f"purge of {queued:,} queued jobs: longest Redis stall", "ms", "< 50", stall.worst * 1000,
        stall.worst < 0.05, purge_s=wall, ping_ms=stall.ping * 1000, events=stall.events)
    if args.scale_until == "queue":
        return out
    r.set(f"hegelion:run:{RUN}:zdict", zdict)

    # 4. 1 M samples of ~5 KB committed as workers commit them
    before = used(r)
    t0 = time.perf_counter()
    committed, json_bytes = asyncio.run(_commit_samples(bench, english, n))
    commit_s = time.perf_counter() - t0
    per_sample = (used(r) - before) / committed
    fig(f"Redis per finished sample ({json_bytes:,.0f} B of JSON on average), {committed:,} committed", "B",
        "<= 1500", per_sample, per_sample <= 1500, commits_per_s=committed / commit_s)
    t_status = _status_ms(bench, RUN)
    fig(f"status of a run with {committed:,} samples (per call)", "ms", "< 50", t_status, t_status < 50)

    # 5. export: throughput and memory
    out_path = bench.tmp / "export.jsonl"
    wall, kib = bench.run_timed([*HQ, "export", "--run", RUN, "-o", str(out_path)], env)
    fig(f"export of {committed:,} samples to JSONL (whole process)", "samples/s", ">= 50,000", committed / wall,
        committed / wall >= 50_000, wall_s=wall, bytes=out_path.stat().st_size)
    fig("export: peak RSS", "MB", "flat (report)", kib / 1024, None)
    out_path.unlink()

    # 6. AOF rewrite of everything in Redis now
    t0 = time.perf_counter()
    r.config_set("appendonly", "yes")
    time.sleep(0.2)
    while r.info("persistence")["aof_rewrite_in_progress"] or r.info("persistence").get("aof_rewrite_scheduled"):
        time.sleep(0.05)
    fig(f"AOF rewrite, Redis holding {used(r) / 2**20:,.0f} MiB", "s", "report", time.perf_counter() - t0, None)
    r.config_set("appendonly", "no")

    # 7. retry-failed of 100 k dead letters
    letters = args.scale_dead
    asyncio.run(_dead_letters(bench, english, letters))
    with Stall(bench.redis.client()) as stall:
        wall, _ = bench.run_timed([*HQ, "retry-failed", "--run", "dead"], env)
    revived = r.zcard("hegelion:queue")
    fig(f"retry-failed of {letters:,} dead letters: longest Redis stall", "ms", "< 50", stall.worst * 1000,
        stall.worst < 0.05 and revived == letters, wall_s=wall, revived=revived, ping_ms=stall.ping * 1000,
        events=stall.events)

    # 8. purge of the run with 1 M samples (large set, stream and hash)
    with Stall(bench.redis.client()) as stall:
        wall, _ = bench.run_timed([*HQ, "purge", "--run", RUN, "--yes"], env)
    fig(f"purge of a run with {committed:,} samples: longest Redis stall", "ms", "< 50", stall.worst * 1000,
        stall.worst < 0.05, purge_s=wall, ping_ms=stall.ping * 1000, events=stall.events)
    bench.flush()
    return out


def _status_ms(bench: Any, run: str, calls: int = 20) -> float:
    from hegelion_queue import keys
    from hegelion_queue.queue import status
    from hegelion_queue.queue.connection import connect
    from hegelion_queue.settings import Settings

    async def go() -> float:
        s = Settings(redis_url=bench.redis.url)
        redis = await connect(s)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await status.collect(redis, s, keys.RunKeys(s.key_prefix, run))
            times.append((time.perf_counter() - t0) * 1000)
        await redis.aclose()
        return statistics.median(times)

    return asyncio.run(go())


async def _commit_samples(bench: Any, english: English, n: int) -> tuple[int, float]:
    from hegelion_queue.queue import codec, store
    from hegelion_queue import keys
    from hegelion_queue.queue.connection import connect
    from hegelion_queue.sources.read import prompt_id
    from hegelion_queue.settings import Settings

    s = Settings(redis_url=bench.redis.url)
    redis = await connect(s)
    rk = keys.RunKeys(s.key_prefix, RUN)
    c = await codec.for_run(redis, rk)
    committed, size = 0, 0
    for lo in range(0, n, 500):
        batch = []
        for row in range(lo, min(n, lo + 500)):
            text = f"{english.text(410)} (#{row})"
            batch.append((prompt_id(text), english.sample(text, prompt_id(text), RUN, row, 2100)))
        size += sum(len(orjson.dumps(x)) for _, x in batch[:5])
        got = await asyncio.gather(*(store.commit(redis, rk, pid, x, 30.0, {"output": 1400}, None, c)
                                     for pid, x in batch))
        committed += sum(1 for ok, _, _ in got if ok)
    await redis.aclose()
    return committed, size / (5 * len(range(0, n, 500)))


async def _dead_letters(bench: Any, english: English, n: int) -> None:
    from hegelion_queue import keys
    from hegelion_queue.queue import store
    from hegelion_queue.queue.connection import connect
    from hegelion_queue.sources.read import prompt_id
    from hegelion_queue.settings import Settings

    s = Settings(redis_url=bench.redis.url)
    redis = await connect(s)
    rk = keys.RunKeys(s.key_prefix, "dead")
    for lo in range(0, n, 1000):
        calls = []
        for i in range(lo, min(n, lo + 1000)):
            text = f"{english.text(410)} (dead #{i})"
            record = {"prompt_id": prompt_id(text), "run": "dead", "prompt": text,
                      "source": {"dataset": "d", "split": "train", "row": i}}
            letter = {"record": record, "attempts": 5, "reason": "teacher", "error": "exit 75",
                      "raw_output": english.text(2000), "stderr_tail": "429 Too Many Requests"}
            calls.append(store.dead_letter(redis, rk, record["prompt_id"], letter))
        await asyncio.gather(*calls)
    await redis.aclose()


def sizes(add: Callable[..., Any]) -> None:
    add("--scale", action="store_true", help="the scale run: 1 M prompts and samples, no teacher (about 15 minutes)")
    add("--scale-rows", type=int, default=1_000_000)
    add("--scale-big-rows", type=int, default=5_000_000)
    add("--scale-dead", type=int, default=100_000)
    add("--scale-until", choices=["producer", "queue"], default=None,
        help="with --scale: stop after the producer figures or the queued-prompt ones")

