"""How to reach Redis: one arq pool with the orjson serializer (never pickle) and a clear error."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
from arq.connections import ArqRedis, RedisSettings, create_pool

from . import keys
from .errors import HegelionError
from .settings import Settings

logger = logging.getLogger("hegelion.connection")

PAYLOAD_PREVIEW = 2048  # bytes of an unreadable payload kept in its dead letter


def redacted(url: str) -> str:
    """The URL with any password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def redis_settings(settings: Settings, conn_retries: int = 5) -> RedisSettings:
    try:
        rs = RedisSettings.from_dsn(settings.redis_url)
    except Exception as e:
        raise HegelionError(f"HEGELION_REDIS_URL {redacted(settings.redis_url)!r} is not a Redis URL ({e})") from e
    rs.conn_retries = conn_retries
    rs.conn_timeout = 2
    return rs


def load_job(raw: bytes) -> dict[str, Any]:
    """arq job deserializer: orjson only. A payload that is not a job becomes a job of REJECT_FUNCTION,
    so the worker dead-letters it instead of arq dropping it (and nothing is ever unpickled)."""
    try:
        job = orjson.loads(raw)
        if isinstance(job, dict) and isinstance(job.get("f"), str) and isinstance(job.get("a"), list):
            job.setdefault("k", {})
            job.setdefault("t", None)
            job.setdefault("et", 0)
            return job
        error = "payload is JSON but not an arq job"
    except orjson.JSONDecodeError as e:
        error = f"payload is not JSON ({e})"
    preview = raw[:PAYLOAD_PREVIEW].decode("utf-8", "backslashreplace")
    return {"f": keys.REJECT_FUNCTION, "a": [preview, error], "k": {}, "t": None, "et": 0}


def dump_job(obj: Any) -> bytes:
    return orjson.dumps(obj, default=repr)  # results may hold exceptions: keep their repr


async def connect(settings: Settings, conn_retries: int = 1) -> ArqRedis:
    """An arq pool for the project's queue; a HegelionError naming the URL when Redis cannot be reached."""
    try:
        return await create_pool(
            redis_settings(settings, conn_retries),
            job_serializer=dump_job,
            job_deserializer=load_job,
            default_queue_name=settings.queue_name,
            expires_extra_ms=job_expires_ms(settings),
        )
    except HegelionError:
        raise
    except Exception as e:
        raise HegelionError(
            f"cannot reach Redis at {redacted(settings.redis_url)} ({e.__class__.__name__}: {e}); "
            "start one with `make redis` or set HEGELION_REDIS_URL"
        ) from e


def job_expires_ms(settings: Settings) -> int:
    return int(settings.job_expires_days * 86_400_000)
