"""How to reach Redis: one arq pool with the orjson serializer (never pickle) and a clear error."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import signal
import time
from typing import Any, Awaitable, Callable, TypeVar

import orjson
import arq.worker
from arq.connections import ArqRedis, RedisSettings
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, ConnectionPool, SSLConnection
from redis.asyncio.sentinel import Sentinel
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, ConnectionError, ResponseError, TimeoutError

from .. import keys, redact
from .codec import is_frame
from ..errors import HegelionError
from ..settings import Settings

logger = logging.getLogger("hegelion.connection")

PAYLOAD_PREVIEW = 2048  # bytes of an unreadable payload kept in its dead letter


# ---------------------------------------------------------------- a Redis that keeps every key

NOEVICTION_FIX = ("put `maxmemory-policy noeviction` in redis.conf (or run `redis-cli CONFIG SET maxmemory-policy "
                  "noeviction`)")
_said_unchecked = False  # the warning that the policy cannot be read is given once per process


async def check_eviction(redis: Redis, refuse: bool = True) -> str | None:
    """Redis must keep every key: an evicted queued job, run dictionary or sample is lost for good. A
    maxmemory-policy other than noeviction raises HegelionError naming the line that fixes it (refuse=False:
    returns it as a warning). Where CONFIG is disabled or renamed (managed services) the policy cannot be read:
    a warning saying so is returned, the first time only. None: nothing to say."""
    global _said_unchecked
    try:
        policy = (await redis.config_get("maxmemory-policy")).get("maxmemory-policy")
        why = "CONFIG GET answered nothing"
    except ResponseError as e:  # unknown command (disabled or renamed), NOPERM (an ACL without +config)
        policy, why = None, str(e).splitlines()[0][:200]
    if policy is None:
        if _said_unchecked:
            return None
        _said_unchecked = True
        return (f"cannot check Redis's maxmemory-policy ({why}): make sure it is noeviction, or Redis may drop "
                "queued jobs and samples when it runs out of memory")
    if policy == "noeviction":
        return None
    message = (f"Redis runs with maxmemory-policy {policy}: when it runs out of memory it drops keys, and a dropped "
               f"queued job, run dictionary or sample is lost for good; {NOEVICTION_FIX}")
    if refuse:
        raise HegelionError(message)
    return message


# ---------------------------------------------------------------- reaching Redis from other hosts

BACKOFF_BASE = 0.1  # seconds before the first retry; doubles (with jitter) up to BACKOFF_CAP
BACKOFF_CAP = 5.0
LAST_ATTEMPT = 1.0  # seconds a command may take once a stopping worker no longer waits for Redis
RETRIED = (ConnectionError, TimeoutError, OSError)  # a refused / reset / cut connection, Redis still loading
T = TypeVar("T")
# Set inside a Reconnect call and while a connection opens: a connection that opens (or a reconnect inside a
# command) proves nothing, only a command's answer ends an outage.
_NESTED: contextvars.ContextVar[bool] = contextvars.ContextVar("hegelion_reconnect_nested", default=False)


class Reconnect(Retry):
    """redis-py's Retry bounded by time instead of a count, each attempt bounded by `attempt_timeout`.

    arq builds its connections without a socket timeout, so a command sent just before a link is cut would
    wait for TCP to give up (~15 min); the attempt timeout stands in for it: the connection is dropped and
    the command retried on a new one, with capped exponential backoff.
    The `seconds` window is a total per outage, shared by every command of the pool and by the reconnects
    nested inside a command (each of which is retried too): it starts at the first failure and ends when Redis
    answers a command, so neither a retried reconnect nor the next command starts it again.
    `stop()` (a worker shutting down) ends the waiting early: past it, a command gets one short attempt.
    A wrong password or ACL is not retried. Retried writes are safe here: a commit is SADD-guarded.
    """

    __slots__ = ("seconds", "attempt_timeout", "down_since", "stop_at")

    def __init__(self, seconds: float, attempt_timeout: float | None):
        super().__init__(EqualJitterBackoff(cap=BACKOFF_CAP, base=BACKOFF_BASE), -1, RETRIED)
        self.seconds, self.attempt_timeout = seconds, attempt_timeout
        self.down_since: float | None = None  # monotonic time of the outage's first failure
        self.stop_at: float | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> "Reconnect":
        return self  # redis-py copies the policy into each connection: the pool's connections share one window

    def stop(self, grace: float) -> None:
        """No waiting for Redis beyond `grace` seconds from now."""
        self.stop_at = min(self.stop_at or math.inf, time.monotonic() + grace)

    def _attempt_timeout(self) -> float | None:
        if self.stop_at is None:
            return self.attempt_timeout or None
        return min(self.attempt_timeout or math.inf, max(self.stop_at - time.monotonic(), LAST_ATTEMPT))

    async def call_with_retry(self, do: Callable[[], Awaitable[T]], fail: Callable[[Exception], Any]) -> T:
        answered = not _NESTED.get()  # a command's own call, not a reconnect inside one
        nested = _NESTED.set(True)
        try:
            return await self._retried(do, fail, answered)
        finally:
            _NESTED.reset(nested)

    async def _retried(self, do: Callable[[], Awaitable[T]], fail: Callable[[Exception], Any], answered: bool) -> T:
        failures = 0
        while True:
            try:
                timeout = self._attempt_timeout()
                if not timeout:
                    result = await do()
                else:
                    try:
                        result = await asyncio.wait_for(do(), timeout)
                    except asyncio.TimeoutError as e:
                        raise TimeoutError(f"no answer from Redis in {timeout:g}s") from e
                if answered:  # Redis answered a command: the outage is over
                    self.down_since = None
                return result
            except (AuthenticationError, AuthorizationError):
                raise
            except self._supported_errors as error:
                failures += 1
                now = time.monotonic()
                if self.down_since is None:
                    self.down_since = now
                await fail(error)
                left = min(self.down_since + self.seconds, self.stop_at or math.inf) - now
                if left <= 0:
                    raise
                if failures == 1 or failures % 10 == 0:
                    logger.warning("Redis unreachable (%s: %s); retrying for up to %.0fs more",
                                   error.__class__.__name__, error, left)
                await asyncio.sleep(min(left, self._backoff.compute(failures)))


def _sentinel_hosts(spec: str) -> list[tuple[str, int]]:
    hosts = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise HegelionError(f"HEGELION_REDIS_SENTINELS entry {item!r} is not host:port")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def redis_settings(settings: Settings, conn_retries: int = 5, retry_seconds: float | None = None) -> RedisSettings:
    """arq's RedisSettings from ours: user/password and db from the URL, TLS (rediss://) with our CA and
    client certificate, Sentinel, timeouts, and commands retried with backoff for `retry_seconds`
    (default HEGELION_REDIS_RETRY_SECONDS; a worker waits out a restart or a cut link instead of exiting)."""
    try:
        rs = RedisSettings.from_dsn(settings.redis_url)
    except Exception as e:
        raise HegelionError(redact.text(f"HEGELION_REDIS_URL {settings.redis_url!r} is not a Redis URL ({e})")) from e
    if rs.ssl:
        rs.ssl_ca_certs = settings.redis_ssl_ca_certs or None
        rs.ssl_certfile = settings.redis_ssl_certfile or None
        rs.ssl_keyfile = settings.redis_ssl_keyfile or None
        rs.ssl_check_hostname = settings.redis_ssl_check_hostname
    if settings.redis_sentinels:  # create_pool below reaches the master with all of these (arq would not)
        rs.host, rs.sentinel = _sentinel_hosts(settings.redis_sentinels), True
        rs.sentinel_master = settings.redis_sentinel_master
    rs.conn_timeout = settings.redis_connect_timeout  # type: ignore[assignment]  # a float works
    seconds = settings.redis_retry_seconds if retry_seconds is None else retry_seconds
    rs.retry = Reconnect(seconds, settings.redis_socket_timeout or None)
    rs.retry_on_error = list(RETRIED)
    rs.conn_retries = 0 if seconds else conn_retries  # the first ping already retries for `seconds`
    return rs


MAX_JOB_TRY = 1000  # a payload's own try count ("t") above this is not one we or arq wrote


def _job_error(job: Any, functions: frozenset[str] | None) -> str | None:
    """Why a decoded payload is not a job arq can run safely, or None. arq reads "t" and "et" outside its
    try block (a bad one kills the worker) and drops a job whose kwargs or function it cannot use."""
    if not (isinstance(job, dict) and isinstance(job.get("f"), str) and isinstance(job.get("a"), list)):
        return "payload is JSON but not an arq job"
    if functions is not None and job["f"] not in functions:
        return f"no function {job['f'][:100]!r} on this queue"
    if not isinstance(job.get("k", {}), dict):
        return "job keyword arguments are not an object"
    t = job.get("t")
    if t is not None and not (type(t) is int and 0 <= t <= MAX_JOB_TRY):
        return f"job try {str(t)[:100]!r} is not a small whole number"
    if type(job.get("et", 0)) not in (int, float):
        return f"enqueue time {str(job.get('et'))[:100]!r} is not a number"
    return None


def connection_kwargs(rs: RedisSettings) -> dict[str, Any]:
    """What a connection to the Redis master needs, Sentinel or not: credentials, db, TLS with our CA and
    client certificate, connect timeout, and the Reconnect policy (with its per-attempt timeout)."""
    kw: dict[str, Any] = {"db": rs.database, "username": rs.username, "password": rs.password,
                          "socket_connect_timeout": rs.conn_timeout, "retry": rs.retry,
                          "retry_on_error": rs.retry_on_error, "max_connections": rs.max_connections}
    if rs.ssl:
        kw.update(ssl=True, ssl_keyfile=rs.ssl_keyfile, ssl_certfile=rs.ssl_certfile, ssl_cert_reqs=rs.ssl_cert_reqs,
                  ssl_ca_certs=rs.ssl_ca_certs, ssl_ca_data=rs.ssl_ca_data, ssl_check_hostname=rs.ssl_check_hostname)
    return kw


def _sentinel_kwargs(rs: RedisSettings) -> dict[str, Any]:
    """The sentinels themselves are asked with bounded waits: a dead one is skipped, not waited on."""
    attempt = rs.retry.attempt_timeout if isinstance(rs.retry, Reconnect) else None
    return {"socket_connect_timeout": rs.conn_timeout, "socket_timeout": attempt or rs.conn_timeout}


class _RetriedHandshake:
    """redis-py retries a command but not the handshake of a new connection (AUTH, SELECT, CLIENT SETINFO): a
    link cut or a Redis restart at that moment raised straight out of arq's loop and the worker exited."""

    retry: Retry

    async def connect(self) -> None:
        nested = _NESTED.set(True)
        try:
            await self.retry.call_with_retry(super().connect, lambda error: self.disconnect())  # type: ignore[misc]
        finally:
            _NESTED.reset(nested)


class RetriedConnection(_RetriedHandshake, Connection):
    pass


class RetriedSSLConnection(_RetriedHandshake, SSLConnection):
    pass


async def create_pool(rs: RedisSettings, **arq_options: Any) -> ArqRedis:
    """arq's create_pool, with every connection set up from `connection_kwargs` and its handshake retried.
    Through Sentinel, arq passes only db, user, password and ssl to the master's connections: a stopped master
    hung a command for as long as TCP allows, a reset was not retried and a private CA failed TLS."""
    kw = connection_kwargs(rs)
    if rs.sentinel:  # SentinelManagedConnection retries its whole connect (handshake included) already
        client = Sentinel(rs.host, sentinel_kwargs=_sentinel_kwargs(rs), **kw).master_for(
            rs.sentinel_master, redis_class=ArqRedis)
    else:
        cls = RetriedSSLConnection if kw.pop("ssl", False) else RetriedConnection
        client = ArqRedis.from_pool(ConnectionPool(connection_class=cls, host=rs.host, port=rs.port, **kw))
    for name, value in arq_options.items():  # job_serializer, job_deserializer, default_queue_name, …
        setattr(client, name, value)
    for attempt in range(rs.conn_retries + 1):
        try:
            await client.ping()
            return client
        except Exception:
            if attempt == rs.conn_retries:
                await client.aclose()
                raise
            await asyncio.sleep(rs.conn_retry_delay)
    raise AssertionError("unreachable")


STOP_GRACE = 2.0  # seconds a stopping worker still waits for Redis once its drain is over


class Worker(arq.worker.Worker):
    """arq's Worker with its pool from `create_pool` above (arq's own misses our settings behind Sentinel), that
    refuses a Redis that may evict keys, and stops on SIGTERM whether Redis answers or not."""

    _stopper: asyncio.Task[None] | None = None

    async def main(self) -> None:
        if self._pool is None:
            self._pool = await create_pool(
                self.redis_settings, job_deserializer=self.job_deserializer, job_serializer=self.job_serializer,
                default_queue_name=self.queue_name, expires_extra_ms=self.expires_extra_ms,
            )
        try:
            if warning := await check_eviction(self._pool):
                logger.warning("%s", warning)
        except HegelionError as e:
            logger.error("refusing to start: %s", e)
            raise SystemExit(1) from None
        self.on_stop = self._stopping  # arq calls it from its signal handlers once the drain is over
        await super().main()

    def _retry(self) -> Reconnect | None:
        retry = self.pool.connection_pool.connection_kwargs.get("retry") if self._pool is not None else None
        return retry if isinstance(retry, Reconnect) else None

    def _stopping(self, signum: Any = None) -> None:
        """After the drain: Redis is waited for STOP_GRACE seconds more at most (jobs still in flight come back
        through arq's in-progress timeout, as after a crash), and the main task is cancelled until it ends:
        Python 3.11's asyncio.wait_for loses a cancellation that arrives as its command completes, and the
        worker then polled on for good."""
        if retry := self._retry():
            retry.stop(STOP_GRACE)
        if self._stopper is None:
            self._stopper = self.loop.create_task(self._cancel_until_stopped())

    async def _cancel_until_stopped(self) -> None:
        while self.main_task is not None and not self.main_task.done():
            self.main_task.cancel()
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        """arq's close, carried through when Redis does not answer (each step is bounded by the stop grace)."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if self._pool is None:
            return
        if retry := self._retry():
            retry.stop(STOP_GRACE)
        for outcome in await asyncio.gather(*self.tasks.values(), return_exceptions=True):
            if isinstance(outcome, Exception):
                logger.warning("a job ended with %s: %s (it runs again after arq's in-progress timeout)",
                               type(outcome).__name__, outcome)
        try:
            await self.pool.delete(self.health_check_key)
        except RETRIED as e:
            logger.warning("stopping without Redis (%s: %s)", type(e).__name__, e)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        await self.pool.close(close_connection_pool=True)
        self._pool = None


def install_worker(cls: type[arq.worker.Worker] = Worker) -> None:
    """Make `arq <settings>` build `cls`: arq's CLI constructs `arq.worker.Worker` by name and has no setting
    for the class, so the settings module that wants another swaps it in when imported."""
    arq.worker.Worker = cls  # type: ignore[misc]


def sync_client(settings: Settings) -> SyncRedis:
    """A blocking client (the training thread's progress writer) reaching Redis as the workers do: Sentinel,
    TLS with our CA, timeouts. No retry policy: a progress row that fails is skipped, training goes on."""
    rs = redis_settings(settings, retry_seconds=0)
    kw = {k: v for k, v in connection_kwargs(rs).items() if k not in ("retry", "retry_on_error")}
    kw["socket_timeout"] = settings.redis_socket_timeout or None
    if rs.sentinel:
        from redis.sentinel import Sentinel as SyncSentinel

        return SyncSentinel(rs.host, sentinel_kwargs=_sentinel_kwargs(rs), **kw).master_for(rs.sentinel_master)
    return SyncRedis(host=rs.host, port=rs.port, **kw)


def load_job(raw: bytes, functions: frozenset[str] | None = None) -> dict[str, Any]:
    """arq job deserializer: orjson only. A payload that is not a job arq can run (with one of `functions`,
    when given) becomes a job of REJECT_FUNCTION, so the worker dead-letters it instead of arq dropping it or
    crashing on it (and nothing is ever unpickled)."""
    try:
        # a packed generator job (producer.job_payload): `generate` unpacks it with the run's dictionary
        job = ({"f": keys.GENERATE_FUNCTION, "a": [{PACKED: raw}], "et": time.time() * 1000}
               if is_frame(raw) else orjson.loads(raw))
        error = _job_error(job, functions)
        if error is None:
            job.setdefault("k", {})
            job.setdefault("t", None)
            job.setdefault("et", 0)
            return job
    except orjson.JSONDecodeError as e:
        error = f"payload is not JSON ({e})"
    preview = raw[:PAYLOAD_PREVIEW].decode("utf-8", "backslashreplace")
    return {"f": keys.REJECT_FUNCTION, "a": [preview, error], "k": {}, "t": None, "et": 0}


PACKED = "packed"  # the argument of a packed generator job: its payload as stored


def job_loader(*functions: str) -> Callable[[bytes], dict[str, Any]]:
    """A worker's deserializer: a job for a function it does not have is dead-lettered too."""
    return functools.partial(load_job, functions=frozenset(functions))


def dump_job(obj: Any) -> bytes:
    return orjson.dumps(obj, default=repr)  # results may hold exceptions: keep their repr


async def connect(settings: Settings, conn_retries: int = 1) -> ArqRedis:
    """An arq pool for the project's queue; a HegelionError naming the URL when Redis cannot be reached."""
    try:
        return await create_pool(
            redis_settings(settings, conn_retries, retry_seconds=0),  # a command-line call fails fast
            job_serializer=dump_job,
            job_deserializer=load_job,
            default_queue_name=settings.queue_name,
        )
    except HegelionError:
        raise
    except Exception as e:
        raise HegelionError(
            f"cannot reach Redis at {redact.text(settings.redis_url)} ({e.__class__.__name__}: {redact.text(str(e))}); "
            "start one with `make redis` or set HEGELION_REDIS_URL"
        ) from e
