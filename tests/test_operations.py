"""Operating a run: status vs redis-cli, tail, runs, purge, the shared rate limit, heartbeats."""

from __future__ import annotations

import subprocess
import time

import orjson
import pytest

from .conftest import ULTRA
from .test_generator_e2e import wait_finished, workers  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e


def cli(redis_server, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(redis_server.port), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_readme_redis_cli_commands_agree_with_status(hq, workers, redis_server, env):  # noqa: F811
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "6", "--run", "other")
    group = workers(1, FAKE_KIMI_FAIL_TIMES="1", HEGELION_MAX_TRIES="1", HEGELION_MAX_JOBS="2")
    r = redis_server.client()
    wait_finished(r, "other")
    time.sleep(0.3)
    st = orjson.loads(hq("status", "--run", "other", "--json").stdout)
    assert cli(redis_server, "GET", "hegelion:queue:health-check") == st["health_check"] != None  # noqa: E711
    group.stop(timeout=20)
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "20", "--run", "depth")
    for run in ("other", "depth"):
        st = orjson.loads(hq("status", "--run", run, "--json").stdout)
        now_ms = int(time.time() * 1000)
        assert int(cli(redis_server, "ZCARD", "hegelion:queue")) == st["queue"]["total"]
        assert int(cli(redis_server, "ZCOUNT", "hegelion:queue", "-inf", str(now_ms))) == st["queue"]["due"]
        assert int(cli(redis_server, "SCARD", f"hegelion:run:{run}:done")) == st["done"]
        assert int(cli(redis_server, "HLEN", f"hegelion:run:{run}:dead")) == st["dead"]
        assert int(cli(redis_server, "XLEN", f"hegelion:run:{run}:results")) == st["results_stream"]
        assert int(cli(redis_server, "SCARD", f"hegelion:run:{run}:enqueued")) == st["enqueued"]
        assert st["dead"] + st["done"] + st["pending"] == st["enqueued"]
    assert st["queue"]["total"] == st["pending"] == 20


def test_status_lists_live_workers_by_host_and_tail_shows_samples(hq, workers, redis_server, env):  # noqa: F811
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "8", "--run", "live")
    workers(2, FAKE_KIMI_DELAY="0.3")
    r = redis_server.client()
    wait_finished(r, "live")
    time.sleep(1.5)  # heartbeats publish changes within a second
    st = orjson.loads(hq("status", "--run", "live", "--json").stdout)
    assert len(st["workers"]) == 2 and sum(w["done"] for w in st["workers"]) == 8
    assert st["samples_per_min_5m"] > 0
    text = hq("status", "--run", "live").stdout
    assert "workers alive: 2" in text and "8 done, 0 dead" in text
    out = hq("tail", "--run", "live", "-n", "2").stdout
    assert out.count("prompt:") == 2 and out.count("synthesis:") == 2 and "attempts 1" in out


def test_resume_and_purge_go_through_the_queue_in_batches_and_touch_only_their_run(hq, redis_server, env,
                                                                                   monkeypatch):
    """resume makes a run's deferred jobs due and purge removes them, a batch at a time (7 here: many batches),
    never touching another run's jobs."""
    import asyncio

    from hegelion_queue.jobs import producer
    from hegelion_queue.queue.connection import connect
    from hegelion_queue.settings import get_settings

    hq("enqueue", "--dataset", str(ULTRA), "--limit", "30", "--run", "mine")
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "30", "--run", "other")
    r = redis_server.client()
    later = 4_000_000_000_000  # deferred far into the future
    r.zadd("hegelion:queue", {j: later for j in r.zrange("hegelion:queue", 0, -1)})
    monkeypatch.setattr(producer, "PURGE_BATCH", 7)

    async def go(call):
        redis = await connect(get_settings())
        try:
            return await call(redis, get_settings(), "mine")
        finally:
            await redis.aclose()

    asyncio.run(go(producer.resume))
    queued = r.zrange("hegelion:queue", 0, -1, withscores=True)
    mine = [score for j, score in queued if j.startswith(b"mine:")]
    assert len(mine) == 30 and max(mine) < later
    assert all(score == later for j, score in queued if j.startswith(b"other:"))
    _, removed = asyncio.run(go(producer.purge_run))
    left = [j for j in r.zrange("hegelion:queue", 0, -1) if j.startswith(b"mine:")]
    assert removed == 30 and not left and r.zcard("hegelion:queue") == 30
    assert not r.keys("arq:job:mine:*") and len(r.keys("arq:job:other:*")) == 30


def test_runs_and_purge_touch_only_their_run(hq, redis_server, env):
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "3", "--run", "keep")
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "4", "--run", "drop")
    r = redis_server.client()
    r.set("someone:else:key", "1")
    r.set("hegelion:run:dropx:meta", "not ours to delete")  # a run whose name starts the same
    listing = hq("runs").stdout
    assert "keep: 0 done, 0 dead of 3" in listing and "drop: 0 done, 0 dead of 4" in listing
    out = hq("purge", "--run", "drop", "--yes").stdout
    assert "4 queued jobs" in out
    assert r.zcard("hegelion:queue") == 3 and r.exists("hegelion:run:keep:meta")
    assert not r.exists("hegelion:run:drop:meta") and not r.keys("arq:job:drop:*")
    assert r.get("someone:else:key") == b"1" and r.exists("hegelion:run:dropx:meta")
    assert "drop:" not in hq("runs").stdout


def test_invalid_run_name_is_refused(hq):
    p = hq("enqueue", "--dataset", str(ULTRA), "--run", "a:*", check=False)
    assert p.returncode == 1 and "run name" in p.stderr


def test_rate_limit_holds_across_three_workers(hq, workers, redis_server, env):  # noqa: F811
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "40", "--run", "rl")
    workers(3, HEGELION_RATE_LIMIT="240", HEGELION_MAX_IN_FLIGHT="4")
    wait_finished(redis_server.client(), "rl", timeout=60)
    calls = sorted(orjson.loads(line)["t"] for line in open(env["FAKE_KIMI_LOG"], "rb"))
    assert len(calls) == 40
    rate = (len(calls) - 1) / (calls[-1] - calls[0]) * 60  # per minute, after the first call
    assert 240 * 0.9 <= rate <= 240 * 1.1, f"observed {rate:.0f}/min for a limit of 240/min"


def test_a_429_makes_the_whole_run_back_off(hq, workers, redis_server, env):  # noqa: F811
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "3", "--run", "backoff")
    # one slot: after prompt A's 429 the worker takes prompt B at once, but the shared backoff holds it
    workers(1, FAKE_KIMI_FAIL_TIMES="1", HEGELION_RATE_LIMIT="6000", HEGELION_MAX_JOBS="1",
            HEGELION_RETRY_BASE="1", HEGELION_RETRY_CAP="1")
    wait_finished(redis_server.client(), "backoff", timeout=60)
    starts = sorted(orjson.loads(line)["t"] for line in open(env["FAKE_KIMI_LOG"], "rb"))
    assert len(starts) == 6  # each prompt: one 429, one success
    assert starts[1] - starts[0] >= 0.9, "the next call did not wait for the run-wide backoff"


def test_exports_sft_scu_dpo_and_summary(hq, workers, redis_server, env, tmp_path):  # noqa: F811
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "4", "--run", "ex")
    workers(1)
    wait_finished(redis_server.client(), "ex")
    hq("export", "--run", "ex", "--output", str(tmp_path / "sft.jsonl"))
    hq("export", "--run", "ex", "--format", "scu", "--output", str(tmp_path / "scu.jsonl"))
    hq("export", "--run", "ex", "--format", "dpo", "--rejected", "both", "--output", str(tmp_path / "dpo.jsonl"))
    sft = [orjson.loads(x) for x in (tmp_path / "sft.jsonl").read_bytes().splitlines()]
    scu = [orjson.loads(x) for x in (tmp_path / "scu.jsonl").read_bytes().splitlines()]
    dpo = [orjson.loads(x) for x in (tmp_path / "dpo.jsonl").read_bytes().splitlines()]
    assert len(sft) == len(scu) == 4 and len(dpo) == 8
    assert all(set(x) == {"text"} and "<|im_start|>assistant\n<thought>" in x["text"] for x in scu)
    assert all(set(x) == {"prompt", "chosen", "rejected"} for x in dpo)
    first = sft[0]["hegelion_trace"]
    assert dpo[0]["chosen"].startswith(first["synthesis"]) and dpo[0]["rejected"] == first["thesis"]
    assert dpo[1]["rejected"] == first["antithesis"]
    summary = orjson.loads((tmp_path / "data" / "ex.summary.json").read_bytes())
    assert summary["done"] == 4 and summary["per_sample"]["teacher_seconds"] > 0
