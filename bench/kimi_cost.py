"""Teacher cost figures with the real kimi-cli against a local OpenAI-compatible server that answers at once.

The parent starts the server and runs `python -m bench.kimi_cost WHAT N` as a child; os.wait4 gives the
child's wall time and CPU, which include every kimi process it started (all are reaped before it exits).
WHAT: `wire` / `print` (our Teacher in that mode) or `default-agent` / `bare-agent` (a plain
`kimi --print` per prompt, with kimi's default agent or with ours).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.openai_server import ChatServer
from tests.real_kimi import real_kimi as kimi_bin

ROOT = Path(__file__).resolve().parent.parent


def measure(what: str, n: int) -> dict | None:
    """Wall and CPU seconds per prompt, or None when kimi-cli is not installed."""
    kimi = kimi_bin()
    if kimi is None:
        return None
    with ChatServer() as server:
        env = {**os.environ, "KIMI_BASE_URL": server.base_url, "KIMI_API_KEY": "bench", "KIMI_MODEL_NAME": "bench",
               "HEGELION_KIMI_BIN": kimi, "HEGELION_TEACHER": "kimi", "HEGELION_MAX_JOBS": "1",
               "HEGELION_TEACHER_TIMEOUT": "120", "PYTHONPATH": str(ROOT)}
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "bench.kimi_cost", what, str(n)], env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        if status != 0:
            raise RuntimeError(f"bench.kimi_cost {what} failed")
    return {"wall_s_per_prompt": wall / n, "cpu_s_per_prompt": (ru.ru_utime + ru.ru_stime) / n}


def marginal(what: str, n: int, base: int = 2) -> dict:
    """Per-prompt cost once started: (cost of base + n prompts - cost of base prompts) / n. A wire process
    serves hundreds of prompts, so its one start-up is not a per-sample cost."""
    small, big = measure(what, base), measure(what, base + n)
    per = {k: (big[k] * (base + n) - small[k] * base) / n for k in big}
    return {**per, "with_start_up": big}


async def _teacher(mode: str, n: int) -> None:
    from hegelion_queue.settings import Settings
    from hegelion_queue.teacher.presets import Teacher

    with tempfile.TemporaryDirectory() as home:
        t = Teacher(Settings(kimi_mode=mode), Path(home))
        try:
            for i in range(n):
                await t.ask(f"Benchmark question {i}: is it worth it?")
        finally:
            await t.close()


def _plain_print(default_agent: bool, n: int) -> None:
    from hegelion_queue.teacher.presets import write_agent_file

    with tempfile.TemporaryDirectory() as home:
        argv = [os.environ["HEGELION_KIMI_BIN"], "--print", "--output-format", "stream-json", "--work-dir", home]
        if not default_agent:
            argv += ["--agent-file", str(write_agent_file(Path(home) / "agent"))]
        env = {**os.environ, "KIMI_SHARE_DIR": str(Path(home) / "share")}
        for i in range(n):
            subprocess.run(argv, input=f"Answer briefly: question {i}".encode(), env=env, check=True,
                           capture_output=True)


if __name__ == "__main__":
    what, n = sys.argv[1], int(sys.argv[2])
    if what in ("wire", "print"):
        asyncio.run(_teacher(what, n))
    else:
        _plain_print(what == "default-agent", n)
