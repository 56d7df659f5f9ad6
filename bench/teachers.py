"""What a teacher slot costs: memory per in-flight prompt and CPU per sample of the real Kimi Code over ACP, the
legacy kimi-cli wire pool and a process per prompt, against a local OpenAI-compatible server.

The parent starts the server (each answer waits `delay` seconds, so every slot is in flight at once) and runs
`python -m bench.teachers MODE N SLOTS` as a child: it asks N prompts through a Teacher with SLOTS at once and
samples its teacher processes' total RSS (and PSS) while they are all in flight. os.wait4 gives the child's CPU,
which includes every teacher process it started (all are reaped before it exits).

MODE: `acp` (Kimi Code, `kimi acp`), `wire` (kimi-cli 1.x, `kimi --wire`), `print` (Kimi Code, `kimi -p`).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from bench.figure import Figure
from tests.openai_server import ChatServer
from tests.real_kimi import real_kimi, real_kimi_code

ROOT = Path(__file__).resolve().parent.parent


def binary(mode: str) -> str | None:
    return real_kimi() if mode == "wire" else real_kimi_code()


def measure(mode: str, n: int, slots: int, delay: float) -> dict | None:
    """Memory per in-flight slot (MB), CPU and wall seconds per prompt, or None when that kimi is not installed."""
    kimi = binary(mode)
    if kimi is None:
        return None
    with ChatServer() as server, tempfile.TemporaryDirectory() as home:
        server.delay = delay
        env = {**os.environ, "KIMI_BASE_URL": server.base_url, "KIMI_API_KEY": "bench", "KIMI_MODEL_NAME": "bench",
               "HEGELION_KIMI_BIN": kimi, "HEGELION_TEACHER": "kimi", "HEGELION_KIMI_MODE": mode,
               "HEGELION_MAX_JOBS": str(slots), "HEGELION_TEACHER_TIMEOUT": "600", "HOME": home,
               "PYTHONPATH": str(ROOT)}
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "bench.teachers", mode, str(n), str(slots)], env=env,
                             stdout=subprocess.PIPE)
        out = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
        if status != 0:
            raise RuntimeError(f"bench.teachers {mode} failed")
        wall = time.perf_counter() - t0
    res = orjson.loads(out)
    return {**res, "cpu_s": ru.ru_utime + ru.ru_stime, "wall_s": wall,
            "rss_mb_per_slot": res["rss_mb"] / slots, "pss_mb_per_slot": res["pss_mb"] / slots}


def marginal_cpu(mode: str, n: int, slots: int, base: int) -> float:
    """CPU seconds per prompt once started: (cost of base + n prompts - cost of base prompts) / n."""
    small, big = measure(mode, base, slots, 0.0), measure(mode, base + n, slots, 0.0)
    return (big["cpu_s"] - small["cpu_s"]) / n


def pipeline(bench, n: int, latency: float) -> dict | None:
    """n prompts through Kimi Code over ACP, 2 workers x 64 slots, a provider that answers in `latency` s: the
    generator benchmark (Bench.generate) with the kimi preset instead of the command one."""
    kimi = real_kimi_code()
    if kimi is None:
        return None
    with ChatServer() as server:
        server.delay = latency
        return bench.generate(n, 2, 64, "", HEGELION_TEACHER="kimi", HEGELION_KIMI_BIN=kimi,
                              KIMI_BASE_URL=server.base_url, KIMI_API_KEY="bench", KIMI_MODEL_NAME="bench")


def figures(bench) -> list:
    """The teacher rows of `make bench`."""
    args = bench.args
    slots = args.acp_slots
    memory = Figure(f"teacher memory per in-flight slot: Kimi Code over ACP, {slots} slots in 1 process "
                    f"(total RSS / slots)", "MB", "<= 15")
    versus = Figure(f"teacher memory per in-flight slot: legacy kimi-cli wire pool ({args.wire_slots} slots) / "
                    f"Kimi Code ACP ({slots} slots)", "x", ">= 7")
    printed = Figure(f"teacher memory per in-flight slot: Kimi Code `kimi -p` ({args.wire_slots} at once) / ACP",
                     "x", "report")
    cpu = Figure(f"teacher CPU per sample, marginal over {args.cpu_n} prompts: ACP / legacy wire / print "
                 "(detail: CPU-s per sample)", "x", "report")
    flow = Figure(f"pipeline efficiency: {args.acp_pipeline_n} prompts through Kimi Code over ACP, 1 s provider "
                  "latency, 2 workers x 64 slots (ideal/wall)", "", "report")
    rows = [memory, versus, printed, cpu, flow]
    why = ("skipped in --smoke: real Kimi Code and kimi-cli start-ups, minutes" if args.smoke else
           "skipped: Kimi Code not installed: make kimi" if real_kimi_code() is None else None)
    if why:
        for f in rows:
            f.name += f" ({why})"
        return rows
    legacy = real_kimi() is not None
    for _ in range(args.reps):
        acp = measure("acp", 2 * slots, slots, 2.0)
        memory.values.append(acp["rss_mb_per_slot"])
        memory.detail.append(acp)
        p = measure("print", args.wire_slots, args.wire_slots, 3.0)
        printed.values.append(p["rss_mb_per_slot"] / acp["rss_mb_per_slot"])
        printed.detail.append(p)
        per = {"acp": marginal_cpu("acp", args.cpu_n, 8, 4), "print": marginal_cpu("print", 4, 4, 1)}
        if legacy:
            w = measure("wire", 2 * args.wire_slots, args.wire_slots, 3.0)
            versus.values.append(w["rss_mb_per_slot"] / acp["rss_mb_per_slot"])
            versus.detail.append(w)
            per["wire"] = marginal_cpu("wire", args.cpu_n, 8, 8)
        cpu.values.append(per["acp"] / per.get("wire", per["print"]))
        cpu.detail.append({"cpu_s_per_sample": per})
        run = pipeline(bench, args.acp_pipeline_n, 1.0)
        ideal = args.acp_pipeline_n * 1.0 / 128
        flow.values.append(ideal / run["wall_s"])
        flow.detail.append({**run, "ideal_s": ideal})
    if not legacy:
        versus.name += " (skipped: kimi-cli not installed: make kimi-legacy)"
        cpu.name = cpu.name.replace("legacy wire", "print (kimi-cli not installed)")
    memory.met = max(memory.values) <= 15
    versus.met = min(versus.values) >= 7 if versus.values else None
    return rows


# ------------------------------------------------------------------ the child


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _memory_mb(pids: list[int]) -> tuple[float, float]:
    """Total RSS and PSS of these processes, in MB."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024


async def _child(mode: str, n: int, slots: int) -> dict:
    from hegelion_queue.settings import Settings
    from hegelion_queue.teacher.presets import Teacher

    with tempfile.TemporaryDirectory() as home:
        t = Teacher(Settings(), Path(home))
        peak = {"rss_mb": 0.0, "pss_mb": 0.0, "processes": 0}
        in_flight = 0

        async def one(i: int) -> None:
            nonlocal in_flight
            in_flight += 1
            try:
                await t.ask(f"Benchmark question {i}: is it worth it?")
            finally:
                in_flight -= 1

        async def sample() -> None:
            while True:
                if in_flight >= min(slots, n):  # every slot busy: the figure's moment
                    pids = _descendants(os.getpid())
                    rss, pss = _memory_mb(pids)
                    if rss > peak["rss_mb"]:
                        peak.update(rss_mb=rss, pss_mb=pss, processes=len(pids))
                await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample())
        try:
            await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            sampler.cancel()
            await t.close()
    return {**peak, "prompts": n, "slots": slots}


if __name__ == "__main__":
    mode, n, slots = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sys.stdout.write(orjson.dumps(asyncio.run(_child(mode, n, slots))).decode())
