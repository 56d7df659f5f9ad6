"""A private redis-server on a free port, for tests and harnesses (never a mock): start, stop, restart."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis as redis_sync


class RedisServerMissing(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server of our own on a free port, which tests may kill and start again on the same files."""

    def __init__(self, directory: Path, aof: bool = False, password: str | None = None, args: tuple[str, ...] = ()):
        binary = shutil.which("redis-server")
        if not binary:
            raise RedisServerMissing("redis-server is not on PATH: install it (apt-get install redis-server); "
                                     "the tests and harnesses need a real one")
        self.binary, self.dir, self.aof, self.password = binary, directory, aof, password
        self.args = list(args)  # more redis-server options, e.g. ("--maxmemory-policy", "allkeys-lru")
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
        argv += self.args
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
