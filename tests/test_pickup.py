"""The claiming worker (hegelion_queue/queue/pickup.py) in arq's burst mode: a real `arq --burst` process, a real Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, ULTRA

pytestmark = pytest.mark.e2e


def commands_processed(r) -> int:
    return int(r.info("stats")["total_commands_processed"])


def test_a_burst_worker_with_only_deferred_jobs_sleeps_between_polls_and_stops_on_sigterm(hq, redis_server, env,
                                                                                          tmp_path):
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "3", "--run", "later")
    r = redis_server.client()
    later = (time.time() + 3600) * 1000  # every job deferred by an hour, as a paused run's or a retry's
    r.zadd("hegelion:queue", {j: later for j in r.zrange("hegelion:queue", 0, -1)})
    log = open(tmp_path / "burst.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "arq", "workers.generator.WorkerSettings", "--burst"], cwd=ROOT,
                            env={**os.environ, "HEGELION_POLL_DELAY": "0.2"}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not r.exists("hegelion:queue:health-check"):  # started and polling
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "burst.log").read_text()
            time.sleep(0.1)
        before, t0 = commands_processed(r), time.monotonic()
        time.sleep(3)
        rate = (commands_processed(r) - before) / (time.monotonic() - t0)
        print(f"idle burst worker: {rate:.0f} Redis commands/s")
        assert proc.poll() is None, "a burst worker with deferred jobs queued must wait for them"
        assert rate < 200, f"{rate:.0f} Redis commands/s from an idle burst worker: it does not sleep between polls"
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError("the burst worker was still running 10 s after SIGTERM") from None
        assert time.monotonic() - t0 < 5 + 2  # HEGELION_DRAIN_SECONDS=5 at most, nothing is running
        assert r.zcard("hegelion:queue") == 3  # nothing lost: the deferred jobs are still queued
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
