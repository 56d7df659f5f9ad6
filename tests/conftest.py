"""Shared fixtures: a private redis-server per session (never a mock), settings pointed at it, workers."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports datasets / huggingface_hub
os.environ["HF_DATASETS_OFFLINE"] = "1"

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis as redis_sync

from hegelion_queue.settings import get_settings

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
ULTRA = FIXTURES / "ultrafeedback_binarized"
FAKE_KIMI = ROOT / "tests" / "fake_kimi.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server of our own on a free port, which tests may kill and start again on the same files."""

    def __init__(self, directory: Path, aof: bool = False, password: str | None = None):
        binary = shutil.which("redis-server")
        if not binary:
            pytest.fail("redis-server is not on PATH: install it (apt-get install redis-server); tests need a real one")
        self.binary, self.dir, self.aof, self.password = binary, directory, aof, password
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "yes" if self.aof else "no", "--appendfsync", "everysec",
                "--logfile", str(self.dir / "redis.log")]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except (redis_sync.ConnectionError, redis_sync.BusyLoadingError):
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}; see {self.dir}/redis.log")

    def stop(self, sig: str = "term") -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate() if sig == "term" else self.proc.kill()
            self.proc.wait(10)

    def client(self) -> redis_sync.Redis:
        return redis_sync.Redis.from_url(self.url, socket_connect_timeout=1)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
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
