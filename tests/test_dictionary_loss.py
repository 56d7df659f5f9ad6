"""A run whose zstd dictionary Redis lost, and purges that must not lose prompts: real Redis, real workers, the CLI.
Each of these failed before dictionaries were kept by id and purges were refused and made atomic per batch."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
import redis as redis_sync

from hegelion_queue import keys
from hegelion_queue.queue.codec import PLAIN
from hegelion_queue.errors import HegelionError

from .conftest import wait_for
from .test_generator_e2e import assert_exactly_once, wait_finished, workers  # noqa: F401

pytestmark = pytest.mark.e2e

N = 1100  # 2,200 training records: enough for the run to have a dictionary of its own


def prompts_file(tmp_path: Path, n: int = N) -> Path:
    path = tmp_path / "prompts.txt"
    topics = ["tides", "bridges", "taxes", "bees", "jazz", "glaciers", "chess", "vaccines", "rent", "satellites"]
    path.write_text("".join(f"Question {i}: weigh the case for and against {topics[i % 10]} in town {i * 7}.\n"
                            for i in range(n)))
    return path


def test_a_lost_dictionary_loses_nothing_and_putting_it_back_finishes_the_run(hq, workers, redis_server, env,  # noqa: F811
                                                                             tmp_path):
    r = redis_server.client()
    hq("enqueue", "--prompts-file", str(prompts_file(tmp_path)), "--run", "lost")
    dict_id = int(r.get("hegelion:run:lost:zdict_id"))
    copy = Path(env["HEGELION_DATA_DIR"]) / f"lost.jsonl.zdict-{dict_id}"
    assert copy.read_bytes() == r.get(keys.dictionary("hegelion", dict_id)), "enqueue keeps a copy on disk"

    group = workers(1, HEGELION_MAX_JOBS="16")
    wait_for(lambda: r.scard("hegelion:run:lost:done") >= 100, 60, "100 committed")
    group.stop()
    done = r.scard("hegelion:run:lost:done")
    r.delete(keys.dictionary("hegelion", dict_id))  # a hand DEL, an evicting Redis

    p = hq("export", "--run", "lost", "-o", str(tmp_path / "partial.jsonl"))  # reports, does not abort
    assert f"{done} samples could not be read" in p.stderr and f"dictionary {dict_id}" in p.stderr
    assert (tmp_path / "partial.jsonl").read_bytes() == b""

    workers(1, HEGELION_MAX_JOBS="4")  # a fresh process: nothing cached
    wait_for(lambda: r.hget("hegelion:run:lost:breaker", "kind") == b"dictionary", 60, "paused, loudly")
    time.sleep(2)
    letters = r.hgetall("hegelion:run:lost:dead")
    assert 1 <= len(letters) <= 4, "the run stops: the rest of its jobs rest"
    for letter in (PLAIN.unpack(v) for v in letters.values()):  # packed without the lost dictionary
        assert letter["reason"] == "dictionary" and letter["packed"], "the letter keeps the job's payload"
    status = orjson.loads(hq("status", "--run", "lost", "--json").stdout)
    assert "dictionary" in status["paused"]["reason"]

    refused = hq("retry-failed", "--run", "lost", check=False)  # not yet: the dictionary is still missing
    assert refused.returncode == 1 and "still missing" in refused.stderr
    hq("restore-dictionary", str(copy))
    hq("retry-failed", "--run", "lost")  # revives the letters and resumes the paused run
    wait_finished(r, "lost", timeout=120)
    assert r.hlen("hegelion:run:lost:dead") == 0
    hq("export", "--run", "lost")
    assert_exactly_once(Path(env["HEGELION_DATA_DIR"]) / "lost.jsonl", N)


def test_purge_is_refused_while_the_run_has_jobs_in_progress(hq, workers, redis_server, env, tmp_path):  # noqa: F811
    r = redis_server.client()
    hq("enqueue", "--prompts-file", str(prompts_file(tmp_path, 6)), "--run", "busy")
    workers(1, FAKE_KIMI_DELAY="30", HEGELION_MAX_JOBS="2")
    wait_for(lambda: list(r.scan_iter(match="arq:in-progress:busy:*")), 30, "jobs in progress")
    p = hq("purge", "--run", "busy", "--yes", check=False)
    assert p.returncode == 1 and "2 jobs in progress (busy:" in p.stderr and "--force" in p.stderr
    assert r.zcard("hegelion:queue") == 6 and r.exists("hegelion:run:busy:enqueued")
    p = hq("purge", "--run", "busy", "--yes", "--force")
    assert "6 queued jobs" in p.stdout and r.zcard("hegelion:queue") == 0


def test_an_interrupted_purge_leaves_no_job_a_re_enqueue_would_skip(hq, redis_server, env, tmp_path):
    """The purge is cut where it removed queue entries but not yet the jobs' keys (its connection lost): before,
    the re-enqueue counted those prompts `already_queued`, and they never ran."""
    import asyncio

    from hegelion_queue.jobs import producer
    from hegelion_queue.queue.connection import connect
    from hegelion_queue.settings import get_settings

    path = prompts_file(tmp_path, 30)
    hq("enqueue", "--prompts-file", str(path), "--run", "cut")

    async def cut_purge():
        redis = await connect(get_settings())

        async def lost(*args, **kwargs):
            raise redis_sync.ConnectionError("connection lost")

        redis.unlink = lost  # every UNLINK from here fails, as if the purge were killed before it
        try:
            await producer.purge_run(redis, get_settings(), "cut")
        except (redis_sync.ConnectionError, HegelionError):
            pass
        finally:
            await redis.aclose()

    asyncio.run(cut_purge())
    p = orjson.loads(hq("enqueue", "--prompts-file", str(path), "--run", "cut", "--json").stdout)
    assert p["already_queued"] == 0 and p["enqueued"] == 30
    assert redis_server.client().zcard("hegelion:queue") == 30
