"""Reaching Redis as real deployments do: ACL user and password, TLS with our own CA, Sentinel, timeouts, and
commands that wait out a Redis restart. Real redis-server processes on loopback, never a mock."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from arq.connections import create_pool
from redis.exceptions import ConnectionError, TimeoutError

from hegelion_queue.queue.connection import Reconnect, connect, redis_settings
from hegelion_queue.errors import HegelionError
from hegelion_queue.settings import Settings

from .redis_server import RedisServer, free_port


def settings(url: str, **kw) -> Settings:
    return Settings(redis_url=url, **kw)


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


# ---------------------------------------------------------------- settings alone


def test_url_gives_user_password_and_db():
    rs = redis_settings(settings("redis://worker:s3cret@redis.example:6380/2"))
    assert (rs.host, rs.port, rs.username, rs.password, rs.database, rs.ssl) == (
        "redis.example", 6380, "worker", "s3cret", 2, False)
    assert isinstance(rs.retry, Reconnect) and rs.retry.seconds == 300 and rs.retry.attempt_timeout == 10


def test_rediss_takes_the_ca_and_client_certificate():
    rs = redis_settings(settings("rediss://:pw@redis.example:6380/0", redis_ssl_ca_certs="/etc/hq/ca.pem",
                                 redis_ssl_certfile="/etc/hq/c.pem", redis_ssl_keyfile="/etc/hq/c.key"))
    assert rs.ssl and rs.ssl_ca_certs == "/etc/hq/ca.pem" and rs.ssl_check_hostname
    assert (rs.ssl_certfile, rs.ssl_keyfile) == ("/etc/hq/c.pem", "/etc/hq/c.key")


def test_sentinels_replace_the_host():
    rs = redis_settings(settings("redis://:pw@ignored:6379/1", redis_sentinels="10.0.0.1:26379, s2:26380",
                                 redis_sentinel_master="main"))
    assert rs.sentinel and rs.host == [("10.0.0.1", 26379), ("s2", 26380)] and rs.sentinel_master == "main"
    assert (rs.password, rs.database) == ("pw", 1)
    with pytest.raises(HegelionError, match="not host:port"):
        redis_settings(settings("redis://x", redis_sentinels="s1"))


def test_a_bad_url_is_one_clear_error():
    with pytest.raises(HegelionError, match="is not a Redis URL"):
        redis_settings(settings("http://:secret@host/0"))


# ---------------------------------------------------------------- real servers


def test_acl_user_and_password_from_the_url(redis_server):
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "hqworker", "on", ">w0rker", "~*", "&*", "+@all")
    try:
        url = f"redis://hqworker:w0rker@127.0.0.1:{redis_server.port}/0"

        async def go():
            redis = await create_pool(redis_settings(settings(url)))
            try:
                return await redis.execute_command("ACL", "WHOAMI")
            finally:
                await redis.aclose()

        assert asyncio.run(go()) == b"hqworker"
        t0 = time.monotonic()  # a wrong password is not retried for HEGELION_REDIS_RETRY_SECONDS
        with pytest.raises(HegelionError, match=r"hqworker:\*\*\*@"):
            asyncio.run(connect(settings(url.replace("w0rker", "wrong"))))
        assert time.monotonic() - t0 < 5
    finally:
        admin.execute_command("ACL", "DELUSER", "hqworker")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> Path:
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed: cannot make a test CA")
    d = tmp_path_factory.mktemp("tls")
    run = lambda *a: subprocess.run(a, cwd=d, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=hegelion test CA")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext")
    return d


@pytest.fixture
def tls_redis(tls_files, tmp_path) -> str:
    """A redis-server that speaks TLS only, with a certificate our test CA signed: its rediss:// URL."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--requirepass", "tlspw", "--dir", str(tmp_path),
         "--tls-cert-file", str(tls_files / "server.pem"), "--tls-key-file", str(tls_files / "server.key"),
         "--tls-ca-cert-file", str(tls_files / "ca.pem"), "--tls-auth-clients", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield f"rediss://:tlspw@127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def test_rediss_with_our_own_ca(tls_files, tls_redis):
    async def go(s: Settings):
        redis = await connect(s)
        try:
            return await redis.ping()
        finally:
            await redis.aclose()

    assert asyncio.run(go(settings(tls_redis, redis_ssl_ca_certs=str(tls_files / "ca.pem"))))
    with pytest.raises(HegelionError, match="certificate verify failed"):  # not signed by a CA we trust
        asyncio.run(go(settings(tls_redis)))


def test_sentinel_finds_the_master(tmp_path):
    master = RedisServer(tmp_path / "master", password="mpw")
    master.start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor hqmaster 127.0.0.1 {master.port} 1\nsentinel auth-pass hqmaster mpw\n")
    proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        s = settings("redis://:mpw@unused:1/0", redis_sentinels=f"127.0.0.1:{port}", redis_sentinel_master="hqmaster")

        async def go():
            redis = await connect(s)
            try:
                await redis.set("through-sentinel", "yes")
                return await redis.get("through-sentinel")
            finally:
                await redis.aclose()

        assert asyncio.run(go()) == b"yes"
        assert master.client().get("through-sentinel") == b"yes"
    finally:
        proc.terminate()
        proc.wait(10)
        master.stop()


def test_commands_wait_out_a_redis_restart(tmp_path):
    server = RedisServer(tmp_path / "r", aof=True, password="pw")
    server.start()
    try:
        s = settings(server.url, redis_retry_seconds=30)

        async def go():
            redis = await create_pool(redis_settings(s))
            try:
                await redis.set("n", 1)
                server.stop()
                pending = asyncio.create_task(redis.incr("n"))  # sent while Redis is down
                await asyncio.sleep(1.5)
                assert not pending.done()
                await asyncio.to_thread(server.start)
                return await asyncio.wait_for(pending, 15)
            finally:
                await redis.aclose()

        assert asyncio.run(go()) == 2
    finally:
        server.stop()


def test_retrying_gives_up_after_redis_retry_seconds(tmp_path):
    port = free_port()  # nothing listens there

    async def go():
        return await create_pool(redis_settings(settings(f"redis://127.0.0.1:{port}/0", redis_retry_seconds=1.5)))

    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        asyncio.run(go())
    assert 1.4 < time.monotonic() - t0 < 8


class CuttableLink:
    """A TCP proxy to Redis that can be cut like a network link: while cut, bytes on open connections are held
    (TCP would retransmit them later) and new connections are closed at once (their SYN would get no answer)."""

    def __init__(self, port: int):
        self.port, self.cut, self.accepted = port, False, 0
        self.restored = asyncio.Event()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer):
        if self.cut:
            writer.close()
            return
        self.accepted += 1
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.port)
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer), return_exceptions=True)
        writer.close()
        up_w.close()

    async def _pipe(self, reader, writer):
        while data := await reader.read(65536):
            if self.cut:
                await self.restored.wait()
            writer.write(data)
            await writer.drain()

    def set_cut(self, cut: bool) -> None:
        self.cut = cut
        self.restored.clear() if cut else self.restored.set()


def test_a_cut_link_times_out_and_reconnects_instead_of_hanging(redis_server):
    """arq gives its connections no socket timeout: without HEGELION_REDIS_SOCKET_TIMEOUT a command sent into
    a cut link waits for TCP to give up; with it, the attempt is dropped and retried on a new connection."""

    async def go():
        link = CuttableLink(redis_server.port)
        port = await link.start()
        s = settings(f"redis://127.0.0.1:{port}/0", redis_socket_timeout=0.3, redis_retry_seconds=20)
        redis = await create_pool(redis_settings(s))
        try:
            await redis.set("cut", 1)
            link.set_cut(True)
            pending = asyncio.create_task(redis.incr("cut"))
            await asyncio.sleep(1.5)
            assert not pending.done()
            before = link.accepted
            link.set_cut(False)
            value = await asyncio.wait_for(pending, 10)
            return value, link.accepted - before
        finally:
            await redis.aclose()
            link.server.close()

    value, reconnects = asyncio.run(go())
    assert value in (2, 3)  # 3: the held INCR also arrived once the link was back (a retried write)
    assert reconnects >= 1


def test_gives_up_on_a_peer_that_never_answers():
    """Each attempt is bounded; a server that accepts and then says nothing exhausts HEGELION_REDIS_RETRY_SECONDS."""

    async def go():
        held = []
        server = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        s = settings(f"redis://127.0.0.1:{port}/0", redis_socket_timeout=0.3, redis_retry_seconds=1)
        rs = redis_settings(s)
        from arq.connections import ArqRedis

        redis = ArqRedis(host="127.0.0.1", port=port, retry=rs.retry, retry_on_error=rs.retry_on_error,
                         socket_connect_timeout=1, protocol=2, lib_name=None, lib_version=None)
        t0 = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                await redis.ping()
            return time.monotonic() - t0
        finally:
            await redis.aclose()
            server.close()

    assert 0.9 < asyncio.run(go()) < 5


def test_the_retry_window_is_a_total_not_restarted_by_each_failed_try(tmp_path):
    """A command's retries reconnect (each reconnect retried too) and later commands find Redis still down: all of
    that shares one HEGELION_REDIS_RETRY_SECONDS window, counted from the first failure."""
    server = RedisServer(tmp_path / "r")
    server.start()
    s = settings(server.url, redis_retry_seconds=2, redis_socket_timeout=0.5)

    async def go():
        redis = await create_pool(redis_settings(s))
        try:
            await redis.set("n", 1)
            server.stop("kill")
            t0 = time.monotonic()
            took = []
            for _ in range(3):  # the window is used up by the first: the next ones fail at once
                with pytest.raises((ConnectionError, TimeoutError, OSError)):
                    await redis.incr("n")
                took.append(time.monotonic() - t0)
            return took
        finally:
            await redis.aclose()

    took = asyncio.run(go())
    assert 1.8 < took[0] < 4, f"the first command gave up after {took[0]:.1f}s, not the 2 s window"
    assert took[-1] < 4.5, f"three commands took {took[-1]:.1f}s in all: each restarted the 2 s window"


@pytest.mark.e2e
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "job-in-flight"])
def test_sigterm_stops_a_worker_whose_redis_is_gone_within_drain_seconds(tmp_path, env, hq, busy):
    """The measured case: an idle worker, Redis killed, SIGTERM with HEGELION_DRAIN_SECONDS=2 — it was still running
    40 s later. With a job in flight too; that job is not lost: it is still queued when Redis is back."""
    import signal

    from hegelion_queue.queue.runner import WorkerGroup

    server = RedisServer(tmp_path / "gone", aof=True)
    server.start()
    r = server.client()
    drain = 2
    if busy:
        prompts = tmp_path / "one.txt"
        prompts.write_text("Should the ferry run in winter?\n")
        hq("enqueue", "--prompts-file", str(prompts), "--run", "gone", extra_env={"HEGELION_REDIS_URL": server.url})
        r.execute_command("BGREWRITEAOF")  # on disk before the kill
    group = WorkerGroup(1, env={"HEGELION_REDIS_URL": server.url, "HEGELION_DRAIN_SECONDS": str(drain),
                                "HEGELION_REDIS_RETRY_SECONDS": "300", "FAKE_KIMI_DELAY": "60"},
                        log_dir=tmp_path / "logs")
    try:
        group.start()
        deadline = time.monotonic() + 30
        ready = (lambda: r.keys("arq:in-progress:*")) if busy else (lambda: r.exists("hegelion:queue:health-check"))
        while not ready():  # the worker is up and polling (busy: running the job)
            assert group.alive() and time.monotonic() < deadline, (tmp_path / "logs" / "worker-1.log").read_text()
            time.sleep(0.1)
        job = [k.decode() for k in r.zrange("hegelion:queue", 0, -1)]
        server.stop("kill")
        time.sleep(2)  # the worker is now waiting out the outage
        proc = group.procs[0]
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < drain + 30:
            time.sleep(0.1)
        log = (tmp_path / "logs" / "worker-1.log").read_text()
        print(f"stopped {time.monotonic() - t0:.1f}s after SIGTERM")
        assert proc.poll() is not None, f"still running {drain + 30}s after SIGTERM:\n{log[-2000:]}"
        assert time.monotonic() - t0 < drain + 5, f"took {time.monotonic() - t0:.1f}s to stop:\n{log[-2000:]}"
        assert "Traceback" not in log, log[-3000:]
        server.start()
        assert [k.decode() for k in r.zrange("hegelion:queue", 0, -1)] == job and len(job) == int(busy)
        assert all(r.exists(f"arq:job:{j}") for j in job)  # it runs again after arq's in-progress timeout
    finally:
        group.stop(timeout=5)
        server.stop("kill")


# ---------------------------------------------------------------- a Redis that may evict keys


def start_worker(url: str, log: Path) -> subprocess.Popen:
    import os
    import sys

    from .conftest import ROOT

    return subprocess.Popen([sys.executable, "-m", "arq", "workers.generator.WorkerSettings"], cwd=ROOT,
                            env={**os.environ, "HEGELION_REDIS_URL": url}, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)


@pytest.mark.e2e
def test_a_redis_that_may_evict_is_refused_by_workers_and_run_and_shown_loudly_by_status(tmp_path, env, hq):
    server = RedisServer(tmp_path / "lru", args=("--maxmemory-policy", "allkeys-lru"))
    server.start()
    fix = "`maxmemory-policy noeviction` in redis.conf (or run `redis-cli CONFIG SET maxmemory-policy noeviction`)"
    try:
        worker = start_worker(server.url, tmp_path / "worker.log")
        try:
            code = worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            raise AssertionError("a worker started on a Redis that may evict keys") from None
        log = (tmp_path / "worker.log").read_text()
        assert code != 0 and "maxmemory-policy allkeys-lru" in log and fix in log and "Traceback" not in log, log
        assert not server.client().exists("hegelion:queue:health-check")

        prompts = tmp_path / "prompts.txt"
        prompts.write_text("Is a refused Redis a lost run?\n")
        extra = {"HEGELION_REDIS_URL": server.url}
        run = hq("run", "--prompts-file", str(prompts), "--no-preflight", check=False, extra_env=extra, timeout=60)
        errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
        assert run.returncode == 1 and len(errors) == 1 and "allkeys-lru" in errors[0] and fix in errors[0], run.stderr
        assert server.client().zcard("hegelion:queue") == 0  # refused before anything was enqueued

        status = hq("status", "--json", extra_env=extra)
        assert "WARNING: Redis runs with maxmemory-policy allkeys-lru" in status.stderr and fix in status.stderr
        assert orjson.loads(status.stdout)["enqueued"] == 0  # still shown
    finally:
        server.stop()


@pytest.mark.e2e
def test_a_redis_whose_config_command_is_renamed_is_not_refused_and_said_once(tmp_path, env, hq):
    server = RedisServer(tmp_path / "managed", args=("--rename-command", "CONFIG", ""))
    server.start()
    try:
        worker = start_worker(server.url, tmp_path / "worker.log")
        try:
            deadline = time.monotonic() + 30
            while not server.client().exists("hegelion:queue:health-check"):  # started and polling
                assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                time.sleep(0.1)
        finally:
            worker.terminate()
            worker.wait(30)
        log = (tmp_path / "worker.log").read_text()
        assert log.count("cannot check Redis's maxmemory-policy") == 1, log
        status = hq("status", extra_env={"HEGELION_REDIS_URL": server.url})
        assert status.stderr.count("cannot check Redis's maxmemory-policy") == 1 and "enqueued" in status.stdout
    finally:
        server.stop()
