"""Running the pieces locally: a Redis with AOF, a group of worker processes, waiting for a run."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable
from urllib.parse import urlsplit

from redis import Redis as SyncRedis

from .. import redact
from ..errors import HegelionError
from ..teacher.process import pdeathsig_args
from ..settings import Settings

logger = logging.getLogger("hegelion.runner")

REDIS_DIR = Path("artifacts/redis")
LOG_DIR = Path("artifacts/logs")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}


def redis_alive(url: str) -> bool:
    try:
        return bool(SyncRedis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping())
    except Exception:
        return False


def ensure_redis(settings: Settings, directory: Path = REDIS_DIR) -> str:
    """Use HEGELION_REDIS_URL when it answers; else start a local redis-server with AOF on its port."""
    url = settings.redis_url
    if redis_alive(url):
        return "reachable"
    parts = urlsplit(url)
    if parts.hostname not in LOCAL_HOSTS:
        raise HegelionError(f"Redis at {redact.text(url)} does not answer; start it or fix HEGELION_REDIS_URL")
    binary = shutil.which("redis-server")
    if not binary:
        raise HegelionError("no Redis answers and redis-server is not installed (apt-get install redis-server)")
    directory.mkdir(parents=True, exist_ok=True)
    port = parts.port or 6379
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory.resolve()),
            "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
            "--daemonize", "yes", "--pidfile", str((directory / f"redis-{port}.pid").resolve()),
            "--logfile", str((directory / f"redis-{port}.log").resolve())]
    if parts.password:
        argv += ["--requirepass", parts.password]
    subprocess.run(argv, check=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if redis_alive(url):
            return f"started on port {port} (AOF under {directory})"
        time.sleep(0.1)
    raise HegelionError(f"redis-server did not come up on port {port}; see {directory}/redis-{port}.log")


def stop_on_sigterm() -> None:
    """SIGTERM (docker stop, systemd, a CI timeout) stops a foreground command as Ctrl-C does, so its `finally`
    stops the worker processes it started instead of leaving them running with parent 1."""

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean-up itself must not be interrupted
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


class WorkerGroup:
    """N `arq workers.generator.WorkerSettings` processes; their output prefixed, to a stream or files."""

    def __init__(self, n: int, settings_path: str = "workers.generator.WorkerSettings",
                 env: dict[str, str] | None = None, out: IO[str] | None = None, log_dir: Path | None = None):
        self.n, self.settings_path, self.env = n, settings_path, env
        self.out, self.log_dir = out, log_dir
        self.procs: list[subprocess.Popen[str]] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
        # SIGTERM reaches a worker whose parent died even by SIGKILL: it drains and exits, no orphan
        argv, preexec = pdeathsig_args([sys.executable, "-m", "arq", self.settings_path], signal.SIGTERM)
        for i in range(1, self.n + 1):
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                 start_new_session=True, preexec_fn=preexec)
            self.procs.append(p)
            t = threading.Thread(target=self._pump, args=(i, p), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, i: int, p: subprocess.Popen[str]) -> None:
        sink: IO[str] | None = self.out
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            sink = open(self.log_dir / f"worker-{i}.log", "a", encoding="utf-8")
        assert p.stdout is not None
        for line in p.stdout:
            if sink:
                sink.write(f"[w{i}] {line}")
                sink.flush()
        if sink is not None and sink is not self.out:
            sink.close()

    def alive(self) -> int:
        return sum(p.poll() is None for p in self.procs)

    def stop(self, timeout: float = 90) -> None:
        """SIGTERM: each worker drains its running jobs (job_completion_wait), then exits."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in self._threads:
            t.join(timeout=2)


async def wait_for_run(redis, rk, on_progress: Callable[[int, int, int], None], alive: Callable[[], int],
                       poll: float = 0.5) -> None:
    """Until the run is finished: report (done, dead, enqueued); stop on a paused run or dead workers."""
    while True:
        async with redis.pipeline(transaction=False) as p:
            p.scard(rk.done).hlen(rk.dead).scard(rk.enqueued).exists(rk.finished).hget(rk.breaker, "reason")
            done, dead, total, finished, breaker = await p.execute()
        on_progress(done, dead, total)
        if finished:
            return
        if breaker:
            raise HegelionError(
                f"run {rk.run} paused: {breaker.decode()} -- fix the teacher set-up, then "
                f"`hegelion-queue resume --run {rk.run}`"
            )
        if alive() == 0:
            raise HegelionError(f"every worker exited before run {rk.run} finished; see artifacts/logs/")
        await asyncio.sleep(poll)
