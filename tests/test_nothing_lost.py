"""Issue #13: the ten holes a review found in the exactly-once path, and the suspected cases, each as a
regression test with real parts: a private redis-server (paused with SIGSTOP where the hole needs it), a proxy
that loses replies (tests/lossy_link.py), real arq worker processes, the fake kimi and the real CLI."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from hegelion_queue.queue import jsonl, scripts, store
from hegelion_queue import keys
from hegelion_queue.queue.connection import connect
from hegelion_queue.settings import Settings, get_settings

from .conftest import ROOT, ULTRA, wait_for as wait_until
from .lossy_link import LossyLink
from .redis_server import RedisServer, free_port
from .test_connection import tls_files, tls_redis, wait_port  # noqa: F401  (fixtures)
from .test_generator_e2e import assert_exactly_once, pids_alive, teacher_pids, wait_finished, workers  # noqa: F401

pytestmark = pytest.mark.e2e


def sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


def assert_status_adds_up(hq, run: str) -> dict:
    st = orjson.loads(hq("status", "--run", run, "--json").stdout)
    assert st["done"] + st["dead"] + st["pending"] == st["enqueued"], st
    return st


@pytest.fixture
def link(redis_server):
    links: list[LossyLink] = []

    def make(rate: float = 0.0) -> LossyLink:
        lk = LossyLink(redis_server.port, rate=rate)
        lk.start()
        links.append(lk)
        return lk

    yield make
    for lk in links:
        lk.stop()


# ---------------------------------------------------------------- 1: the finished edge can be lost


def test_1_lost_commit_reply_still_enqueues_training_and_flushes(link, hq, workers, redis_server, env):  # noqa: F811
    lk = link()
    r = redis_server.client()
    r.script_load(scripts.COMMIT_LUA)  # so the lost replies are of commits Redis ran, not of NOSCRIPT
    lk.drop(sha(scripts.COMMIT_LUA), times=3)  # every commit runs in Redis, every first reply is lost
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "3", "--run", "lost")
    workers(1, HEGELION_REDIS_URL=f"redis://127.0.0.1:{lk.port}/0", HEGELION_AUTO_TRAIN="1", HEGELION_MAX_JOBS="1")
    wait_finished(r, "lost", timeout=60)
    assert lk.dropped == 3
    assert_status_adds_up(hq, "lost")
    wait_until(lambda: r.zcard("hegelion:train") == 1, 10, "the finished run's training job")
    assert r.zrange("hegelion:train", 0, -1) == [b"train:lost"]
    path = Path(env["HEGELION_DATA_DIR"]) / "lost.jsonl"
    wait_until(lambda: path.exists() and len(path.read_bytes().splitlines()) == 3, 10, "the JSONL")
    assert_exactly_once(path, 3)


def test_1_a_producer_cut_short_still_gets_training(hq, workers, redis_server, env):  # noqa: F811
    """The producer died between writing enqueue_complete and checking for the end: enqueueing again (adds
    nothing) must finish the run and enqueue its one training job."""
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "2", "--run", "cut")
    r = redis_server.client()
    r.hset("hegelion:run:cut:meta", "enqueue_complete", 0)  # as while the producer still runs
    group = workers(1, HEGELION_AUTO_TRAIN="1")
    wait_until(lambda: r.scard("hegelion:run:cut:done") == 2, 30, "both prompts done")
    group.stop(timeout=20)
    assert not r.exists("hegelion:run:cut:finished") and r.zcard("hegelion:train") == 0
    r.hset("hegelion:run:cut:meta", "enqueue_complete", 1)  # the producer's last write before it died
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "2", "--run", "cut", extra_env={"HEGELION_AUTO_TRAIN": "1"})
    assert r.exists("hegelion:run:cut:finished")
    assert r.zrange("hegelion:train", 0, -1) == [b"train:cut"]
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "2", "--run", "cut", extra_env={"HEGELION_AUTO_TRAIN": "1"})
    assert r.zcard("hegelion:train") == 1  # exactly one


# ---------------------------------------------------------------- 2 and 8: job deadlines


def test_2_redis_paused_during_a_call_loses_no_prompt(hq, workers, redis_server, env):  # noqa: F811
    """Rate limit on, Redis stopped (SIGSTOP) for 6 s while teachers run: every prompt still ends done."""
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "3", "--run", "paused")
    workers(1, HEGELION_RATE_LIMIT="600", FAKE_KIMI_DELAY="1.5", HEGELION_TEACHER_TIMEOUT="2",
            HEGELION_JOB_TIMEOUT_MARGIN="2", HEGELION_REDIS_SOCKET_TIMEOUT="1", HEGELION_REDIS_RETRY_SECONDS="60",
            HEGELION_MAX_JOBS="3")
    log = Path(env["FAKE_KIMI_LOG"])
    wait_until(lambda: log.exists() and log.read_bytes().count(b"\n") >= 1, 30, "a teacher call")
    time.sleep(0.3)
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(6)
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    r = redis_server.client()
    wait_finished(r, "paused", timeout=60)
    assert r.scard("hegelion:run:paused:done") == 3 and r.hlen("hegelion:run:paused:dead") == 0
    assert_status_adds_up(hq, "paused")


def test_8_the_rate_limit_wait_does_not_eat_the_teacher_time(hq, workers, redis_server, env):  # noqa: F811
    """A job that waited its turn (under teacher timeout / 4) and whose teacher answered within its timeout
    is committed at its first attempt, not killed by the job's deadline."""
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "3", "--run", "turns")
    workers(1, HEGELION_RATE_LIMIT="40", FAKE_KIMI_DELAY="7.2", HEGELION_TEACHER_TIMEOUT="8",
            HEGELION_JOB_TIMEOUT_MARGIN="0.5", HEGELION_MAX_JOBS="3", HEGELION_KIMI_MODE="print")
    r = redis_server.client()
    wait_finished(r, "turns", timeout=60)
    hq("export", "--run", "turns", "--output", "turns.jsonl")
    rows = [orjson.loads(x) for x in Path("turns.jsonl").read_bytes().splitlines()]
    assert len(rows) == 3 and [row["hegelion_trace"]["attempts"] for row in rows] == [1, 1, 1]


# ---------------------------------------------------------------- 4: malformed payloads


def test_4_malformed_job_payloads_are_dead_lettered_and_the_worker_lives(hq, workers, redis_server, env):  # noqa: F811
    r = redis_server.client()
    now = int(time.time() * 1000)
    rec = {"run": "mal", "prompt_id": "0" * 64, "prompt": "p"}
    payloads = {
        "mal:try": {"t": "x", "f": "generate", "a": [rec], "k": {}, "et": now},
        "mal:kwargs": {"t": None, "f": "generate", "a": [rec], "k": [1], "et": now},
        "mal:time": {"t": None, "f": "generate", "a": [rec], "k": {}, "et": "soon"},
        "mal:function": {"t": None, "f": "no_such_function", "a": [rec], "k": {}, "et": now},
        "mal:bigtry": {"t": 10**9, "f": "generate", "a": [rec], "k": {}, "et": now},
    }
    for jid, payload in payloads.items():
        r.set(f"arq:job:{jid}", orjson.dumps(payload))
        r.zadd("hegelion:queue", {jid: now})
    group = workers(1)
    wait_until(lambda: r.hlen("hegelion:run:mal:dead") == 5 or not group.alive(), 30, "five dead letters")
    assert group.alive() == 1, "a malformed payload crashed the worker"
    letters = store.dead_letters_sync(r, keys.RunKeys("hegelion", "mal"))
    assert set(letters) == {"try", "kwargs", "time", "function", "bigtry"}
    assert all(x["reason"] == "bad_payload" for x in letters.values())
    assert r.zcard("hegelion:queue") == 0
    assert assert_status_adds_up(hq, "mal")["dead"] == 5


# ---------------------------------------------------------------- 5: the section regex


def test_5_long_runs_of_spaces_parse_in_linear_time():
    from hegelion_queue.dialectic import DialecticError, parse

    t0 = time.perf_counter()
    for text in ("<thought>\n" + " " * 20000 + "x\n</thought>\nok", " " * 20000, "\n".join([" \t" * 5000] * 4),
                 "<think>" * 20000 + "</thought>"):
        with pytest.raises(DialecticError):
            parse(text)
    assert time.perf_counter() - t0 < 0.5


# ---------------------------------------------------------------- 6: the JSONL checkpoint


def test_6_flush_rebuilds_a_file_whose_checkpoint_the_stream_no_longer_holds(env, tmp_path):
    path = tmp_path / "again.jsonl"
    sample = lambda i: {"instruction": f"p{i}", "input": "", "output": "o", "system": "s",  # noqa: E731
                        "hegelion_trace": {"prompt_id": f"id{i}", "run": "again"}}

    async def go():
        redis = await connect(get_settings())
        rk = keys.RunKeys("hegelion", "again")
        try:
            for i in range(3):
                await store.commit(redis, rk, f"id{i}", sample(i))
            await jsonl.flush(redis, rk, path)
            await redis.delete(rk.results, rk.done)  # `purge`, or a restore that lost the entries
            for i in range(4):
                await store.commit(redis, rk, f"id{i}", sample(i))
            return await jsonl.flush(redis, rk, path)
        finally:
            await redis.aclose()

    asyncio.run(go())
    ids = [orjson.loads(x)["hegelion_trace"]["prompt_id"] for x in path.read_bytes().splitlines()]
    assert ids == ["id0", "id1", "id2", "id3"]
    assert list(tmp_path.glob("again.jsonl.stale-*")), "the old file is kept aside"


# ---------------------------------------------------------------- 7: paused and finished prompts spend no turn


def test_7_paused_runs_and_finished_prompts_do_not_take_rate_limit_turns(hq, workers, redis_server, env):  # noqa: F811
    r = redis_server.client()
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "2", "--run", "held")
    r.hset("hegelion:run:held:breaker", mapping={"reason": "test pause", "since": time.time()})
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "1", "--run", "gone")
    r.sadd("hegelion:run:gone:done", *store.enqueued_ids_sync(r, keys.RunKeys("hegelion", "gone")))  # done elsewhere
    workers(1, HEGELION_RATE_LIMIT="6", HEGELION_MAX_IN_FLIGHT="1", HEGELION_BREAKER_RECHECK="0.5")
    wait_until(lambda: r.zcard("hegelion:queue") == 2, 20, "the finished prompt's job to end")
    time.sleep(2)  # the paused run's jobs look again every 0.5 s
    assert not r.exists("hegelion:limit:tat"), "a paused or finished prompt took a rate-limit turn"
    assert r.zcard("hegelion:limit:in_flight") == 0


# ---------------------------------------------------------------- 9: SIGTERM to `hegelion-queue run`


def worker_pids(r) -> set[int]:
    return {orjson.loads(v)["pid"] for k in r.scan_iter(match="hegelion:worker:*") if (v := r.get(k))}


def test_9_sigterm_to_run_stops_its_workers_and_teachers(redis_server, env):
    r = redis_server.client()
    p = subprocess.Popen([str(ROOT / ".venv" / "bin" / "hegelion-queue"), "run", "--dataset", str(ULTRA),
                          "--limit", "8", "--workers", "2", "--run", "term", "--no-preflight"],
                         env={**os.environ, "FAKE_KIMI_DELAY": "30", "HEGELION_MAX_JOBS": "2"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pids = wait_until(lambda: len(w := worker_pids(r)) == 2 and w, 60, "two workers")
        wait_until(lambda: len(teacher_pids(env)) >= 2, 30, "teachers running")
        p.send_signal(signal.SIGTERM)
        p.wait(30)
        wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), 20, "the workers to exit")
        wait_until(lambda: not pids_alive(teacher_pids(env)), 10, "the teachers to exit")
    finally:
        if p.poll() is None:
            p.kill()
        for pid in worker_pids(r):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------- 10: jobs never expire


def test_10_a_long_pause_does_not_expire_jobs(hq, workers, redis_server, env):  # noqa: F811
    short = {"HEGELION_JOB_EXPIRES_DAYS": str(3 / 86400)}  # ignored now; arq dropped such jobs after 3 s
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "2", "--run", "long", extra_env=short)
    r = redis_server.client()
    jobs = [k for k in r.scan_iter(match="arq:job:long:*")]
    assert len(jobs) == 2 and all(r.pttl(k) == -1 for k in jobs), "a queued job has a TTL"
    r.hset("hegelion:run:long:breaker", mapping={"reason": "test pause", "since": time.time()})
    workers(1, HEGELION_BREAKER_RECHECK="0.5", **short)
    time.sleep(5)
    r.delete("hegelion:run:long:breaker")
    wait_finished(r, "long", timeout=30)
    assert r.scard("hegelion:run:long:done") == 2


# ---------------------------------------------------------------- 3: Sentinel with our connection settings


def start_sentinel(tmp_path: Path, master: RedisServer, name: str = "hqmaster") -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = tmp_path / f"sentinel-{port}.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor {name} 127.0.0.1 {master.port} 1\nsentinel auth-pass {name} {master.password}\n")
    proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


@pytest.fixture
def sentinel_master(tmp_path):
    master = RedisServer(tmp_path / "master", aof=True, password="mpw")
    master.start()
    proc, port = start_sentinel(tmp_path, master)
    yield master, port
    master.proc.send_signal(signal.SIGCONT)
    proc.terminate()
    proc.wait(10)
    master.stop()


def test_3_a_stopped_master_behind_sentinel_times_out_instead_of_hanging(sentinel_master):
    master, port = sentinel_master
    s = Settings(redis_url="redis://:mpw@unused:1/0", redis_sentinels=f"127.0.0.1:{port}",
                 redis_sentinel_master="hqmaster", redis_socket_timeout=0.5)

    async def go():
        redis = await connect(s)
        try:
            await redis.set("k", 1)
            master.proc.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await asyncio.wait_for(redis.incr("k"), 8)
            return time.monotonic() - t0
        finally:
            master.proc.send_signal(signal.SIGCONT)
            await redis.aclose()

    assert asyncio.run(go()) < 5


def test_3_a_worker_behind_sentinel_rides_out_a_master_restart(sentinel_master, hq, workers, env):  # noqa: F811
    master, port = sentinel_master
    direct = {"HEGELION_REDIS_URL": master.url}
    via = {"HEGELION_REDIS_URL": "redis://:mpw@unused:1/0", "HEGELION_REDIS_SENTINELS": f"127.0.0.1:{port}",
           "HEGELION_REDIS_SENTINEL_MASTER": "hqmaster", "HEGELION_REDIS_SOCKET_TIMEOUT": "1"}
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "8", "--run", "sent", extra_env=direct)
    group = workers(1, FAKE_KIMI_DELAY="0.5", HEGELION_MAX_JOBS="2", **via)
    r = master.client()
    wait_until(lambda: r.scard("hegelion:run:sent:done") >= 1, 30, "a first sample")
    master.stop()
    time.sleep(1)
    master.start()
    r = master.client()
    wait_finished(r, "sent", timeout=60)
    assert group.alive() == 1, "the worker exited on the master's restart"
    assert r.scard("hegelion:run:sent:done") == 8


def test_progress_writer_reaches_redis_over_tls_with_our_ca(tls_files, tls_redis):  # noqa: F811
    from hegelion_queue.jobs.training_job import progress_writer

    s = Settings(redis_url=tls_redis, redis_ssl_ca_certs=str(tls_files / "ca.pem"))
    rk = keys.RunKeys("hegelion", "tls")
    progress_writer(s, rk, 10)({"step": 3, "loss": 1.5})

    async def read():
        redis = await connect(s)
        try:
            return await redis.hget(rk.train, "step")
        finally:
            await redis.aclose()

    assert asyncio.run(read()) == b"3"


# ---------------------------------------------------------------- suspected: re-sent Lua writes count once


def link_settings(port: int) -> Settings:
    return Settings(redis_url=f"redis://127.0.0.1:{port}/0", redis_socket_timeout=1, redis_retry_seconds=10,
                    rate_limit=6)


def test_resent_claim_and_rate_limit_turn_count_once(env, redis_server, link):
    """The first reply of each script is lost after Redis ran it; redis-py sends it again. The claim still
    returns the job it claimed (else nobody runs it until the claim expires), the turn is taken once."""
    from arq import func
    from arq.connections import create_pool

    from hegelion_queue.queue.connection import redis_settings
    from hegelion_queue.queue.pickup import CLAIM_LUA, ClaimingWorker
    from hegelion_queue.queue.ratelimit import ACQUIRE_LUA, Limiter

    r = redis_server.client()
    lk = link()
    for script in (ACQUIRE_LUA, CLAIM_LUA):
        r.script_load(script)
        lk.drop(sha(script))
    r.zadd("q", {"resent:a": 1})
    r.set("arq:job:resent:a", b"{}")

    async def noop(ctx):
        return None

    async def go():
        s = link_settings(lk.port)
        redis = await create_pool(redis_settings(s))
        try:
            await Limiter(redis, s, slot_ttl=60).acquire(max_wait=1)
            worker = ClaimingWorker(functions=[func(noop, name="noop")], redis_pool=redis, queue_name="q")
            return await worker._claim_jobs(1)
        finally:
            await redis.aclose()

    claimed = asyncio.run(go())
    assert lk.dropped == 2
    sec, usec = r.time()
    ahead = int(r.get("hegelion:limit:tat")) - (sec * 1000 + usec // 1000)  # one turn: <= 10 s, two: ~20 s
    assert ahead <= 15_000, "the re-sent acquire took a second turn"
    assert claimed and claimed[0][0] == "resent:a", "the re-sent claim lost the job it claimed"


def test_resent_attempt_and_config_error_count_once(link, hq, workers, redis_server, env):  # noqa: F811
    """Through a link that loses the first reply to the attempt count and to the configuration-error count:
    each prompt used one attempt, and two errors do not open a breaker whose threshold is three."""
    lk = link()
    lk.drop(b":config_errors")
    lk.drop(b":attempts")
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "2", "--run", "twice")
    workers(1, HEGELION_REDIS_URL=f"redis://127.0.0.1:{lk.port}/0", FAKE_KIMI_MODE="exit1", HEGELION_MAX_JOBS="1",
            HEGELION_BREAKER_THRESHOLD="3", HEGELION_REDIS_SOCKET_TIMEOUT="1")
    r = redis_server.client()
    wait_finished(r, "twice", timeout=30)
    assert lk.dropped == 2
    assert not r.exists("hegelion:run:twice:breaker"), "two configuration errors opened a breaker of three"
    letters = list(store.dead_letters_sync(r, keys.RunKeys("hegelion", "twice")).values())
    assert [x["attempts"] for x in letters] == [1, 1]


# ---------------------------------------------------------------- suspected: the rate limiter's clock


def test_the_rate_limit_uses_redis_time_not_the_host_clock(env, redis_server, monkeypatch):
    from hegelion_queue.queue.ratelimit import Busy, Limiter

    s = Settings(redis_url=redis_server.url, rate_limit=60)  # one turn a second

    async def go():
        redis = await connect(s)
        try:
            real = time.time
            await Limiter(redis, s, slot_ttl=60).acquire(max_wait=3)
            monkeypatch.setattr(time, "time", lambda: real() + 3600)  # this host's clock runs an hour ahead
            await Limiter(redis, s, slot_ttl=60).acquire(max_wait=3)
            monkeypatch.setattr(time, "time", real)
            t0 = time.monotonic()
            try:
                await Limiter(redis, s, slot_ttl=60).acquire(max_wait=3)
            except Busy as e:
                raise AssertionError(f"a host with the right clock waits {e.wait:.0f}s after a fast one") from e
            return time.monotonic() - t0
        finally:
            await redis.aclose()

    assert asyncio.run(go()) < 3


# ---------------------------------------------------------------- suspected: SCAN_MAX busy ids


def test_due_jobs_behind_more_than_scan_max_busy_ids_are_claimed(hq, workers, redis_server, env):  # noqa: F811
    from hegelion_queue.queue.pickup import SCAN_MAX

    r = redis_server.client()
    busy = SCAN_MAX + 100
    with r.pipeline(transaction=False) as p:
        for i in range(busy):  # running elsewhere: at the queue head, each with its in-progress key
            p.zadd("hegelion:queue", {f"busy:{i}": i + 1})
            p.set(f"arq:in-progress:busy:{i}", b"1", px=120_000)
        p.execute()
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "2", "--run", "behind")
    workers(1)
    wait_finished(r, "behind", timeout=20)


# ---------------------------------------------------------------- suspected: drain cancellations


def test_a_drain_cancellation_does_not_use_up_an_attempt(hq, workers, redis_server, env):  # noqa: F811
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "2", "--run", "drain")
    group = workers(1, FAKE_KIMI_DELAY="30", HEGELION_DRAIN_SECONDS="0", HEGELION_MAX_JOBS="2")
    r = redis_server.client()
    wait_until(lambda: len(r.hkeys("hegelion:run:drain:attempts")) == 2, 30, "two attempts running")
    group.stop(timeout=20)  # SIGTERM, no drain time: arq cancels both jobs and queues them again
    assert group.procs[0].returncode is not None
    workers(1)
    wait_finished(r, "drain", timeout=60)
    hq("export", "--run", "drain", "--output", "drain.jsonl")
    rows = [orjson.loads(x) for x in Path("drain.jsonl").read_bytes().splitlines()]
    assert [row["hegelion_trace"]["attempts"] for row in rows] == [1, 1]


def test_a_lost_reply_to_a_new_connections_handshake_is_retried(link, hq, workers, redis_server, env):  # noqa: F811
    """Found by the chaos run's lost replies: redis-py retries commands but not a new connection's handshake
    (CLIENT SETINFO, AUTH), so a reply lost there made the worker exit."""
    lk = link()
    lk.drop(b"SETINFO", times=4)
    hq("enqueue", "--dataset", str(ULTRA), "--limit", "2", "--run", "hello")
    group = workers(1, HEGELION_REDIS_URL=f"redis://127.0.0.1:{lk.port}/0", HEGELION_REDIS_SOCKET_TIMEOUT="1")
    wait_finished(redis_server.client(), "hello", timeout=30)
    assert lk.dropped >= 1 and group.alive() == 1


# ---------------------------------------------------------------- suspected: a SIGTERMed trainer


@pytest.mark.train
def test_a_sigtermed_trainer_stops_training_before_its_job_is_queued_again(hq, redis_server, env, tiny_model,
                                                                            tmp_path):
    """arq re-queues a cancelled job at once; the training thread must have stopped by then, or a second
    trainer would train into the same adapter folder while the first one goes on."""
    import json

    from .make_tiny_model import sample_rows

    rk = keys.RunKeys("hegelion", "stopme")

    async def commit():
        redis = await connect(get_settings())
        try:
            for i, row in enumerate(sample_rows(12)):
                await store.commit(redis, rk, f"{i:064x}", row)
        finally:
            await redis.aclose()

    asyncio.run(commit())
    options = {"iters": 5000, "batch_size": 2, "max_seq_length": 256, "lora_rank": 4, "lora_alpha": 8,
               "num_layers": -1, "steps_per_report": 5, "scu_update_every": 5, "save_every": 5}
    extra = {"HEGELION_TRAIN_MODEL": tiny_model, "HEGELION_TRAIN_OPTIONS": json.dumps(options)}
    hq("train", "--run", "stopme", extra_env=extra)
    from hegelion_queue.queue.runner import WorkerGroup

    trainer = WorkerGroup(1, "workers.trainer.WorkerSettings", env={**os.environ, **extra}, log_dir=tmp_path / "tlog")
    trainer.start()
    try:
        r = redis_server.client()
        wait_until(lambda: int(r.hget(rk.train, "step") or 0) >= 10, 180, "training steps")
        metrics = tmp_path / "artifacts" / "adapters" / "stopme" / "metrics.jsonl"
        t0 = time.monotonic()
        trainer.stop(timeout=60)  # SIGTERM
        assert time.monotonic() - t0 < 30, "the trainer went on training after SIGTERM"
        rows = len(metrics.read_bytes().splitlines())
        time.sleep(2)
        assert len(metrics.read_bytes().splitlines()) == rows, "a training thread outlived its worker"
        assert r.zscore("hegelion:train", "train:stopme") is not None  # queued again, for a trainer to resume
        assert r.hget(rk.train, "state") == b"interrupted"
    finally:
        trainer.stop(timeout=5)
