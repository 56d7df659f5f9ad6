"""Shared fixtures: a private redis-server per session (never a mock), settings pointed at it, workers."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports datasets / huggingface_hub
os.environ["HF_DATASETS_OFFLINE"] = "1"

import asyncio
import subprocess
import time
from pathlib import Path

import pytest

from hegelion_queue.training import blas
from hegelion_queue.settings import get_settings

blas.use_openblas()  # before any test module imports mlx: training tests run 3-4x faster

from .redis_server import RedisServer, RedisServerMissing

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
ULTRA = FIXTURES / "ultrafeedback_binarized"
FAKE_KIMI = ROOT / "tests" / "fake_kimi.py"

# `make test` runs two processes, a file at a time (pytest-xdist --dist loadfile): the slowest files go first, so
# none is left running alone at the end.
SLOWEST_FIRST = ("test_demo.py", "test_chaos.py", "test_ablate.py", "test_bench.py", "test_multihost.py",
                 "test_kimi_code.py", "test_nothing_lost.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
    except RedisServerMissing as e:
        pytest.fail(str(e))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def env(redis_url, tmp_path, monkeypatch):
    """Settings for one test: its own data dir, the fake teacher, fast retries. Returns the env dict
    that worker subprocesses should get too."""
    values = {
        "HEGELION_REDIS_URL": redis_url,
        "HEGELION_DATA_DIR": str(tmp_path / "data"),
        "HEGELION_KIMI_BIN": str(FAKE_KIMI),
        "HEGELION_RETRY_BASE": "0.2",
        "HEGELION_RETRY_CAP": "1",
        "HEGELION_POLL_DELAY": "0.05",
        "HEGELION_TEACHER_TIMEOUT": "20",
        "HEGELION_JOB_TIMEOUT_MARGIN": "2",
        "HEGELION_AUTO_TRAIN": "0",
        "HEGELION_DRAIN_SECONDS": "5",
        "FAKE_KIMI_STATE": str(tmp_path / "fake_state"),
        "FAKE_KIMI_LOG": str(tmp_path / "fake_kimi.log"),
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)  # artifacts/ of a test stay in its temp dir
    get_settings.cache_clear()
    yield values
    get_settings.cache_clear()


@pytest.fixture
def hq(env):
    """Run the `hegelion-queue` CLI as a user would (a real process)."""

    def run(*args: str, check: bool = True, extra_env: dict | None = None, timeout: float = 120):
        proc = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "hegelion-queue"), *args], capture_output=True, text=True,
            env={**os.environ, **(extra_env or {})}, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"hegelion-queue {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
        return proc

    return run


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Qwen2 built offline (tests/make_tiny_model.py); needs the train extra."""
    pytest.importorskip("mlx_lm", reason="mlx-lm is not importable: pip install -e '.[train]'", exc_type=ImportError)
    from .make_tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2"))


def queued_records(client, run: str, prefix: str = "hegelion", queue: str = "hegelion:queue") -> list[dict]:
    """The prompt records of `run`'s queued jobs, unpacked as a worker does (zstd frames, the run's dictionary)."""
    from hegelion_queue.queue import codec
    from hegelion_queue import keys
    from hegelion_queue.queue.connection import load_job

    c = codec.for_run_sync(client, keys.RunKeys(prefix, run))
    out = []
    for jid in client.zrange(queue, 0, -1):
        jid = jid.decode()
        if jid.startswith(f"{run}:"):
            packed = load_job(client.get(f"arq:job:{jid}"))["a"][0]["packed"]
            out.append({"prompt_id": jid.partition(":")[2], **c.unpack(packed)})
    return out


def wait_for(predicate, timeout: float, what: str):
    """predicate()'s first truthy value, polled every 0.1 s; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"not {what} after {timeout}s")


def make_teacher(monkeypatch, home: Path, **overrides):
    """A Teacher whose settings are the environment's with HEGELION_<NAME> overrides (set through monkeypatch)."""
    from hegelion_queue.teacher.presets import Teacher

    for k, v in overrides.items():
        monkeypatch.setenv(f"HEGELION_{k.upper()}", str(v))
    get_settings.cache_clear()
    return Teacher(get_settings(), home)


def run_teacher(teacher, coro_fn):
    """Run coro_fn() in a fresh event loop, then close the teacher (its processes) whatever happened."""
    async def main():
        try:
            return await coro_fn()
        finally:
            await teacher.close()

    return asyncio.run(main())
