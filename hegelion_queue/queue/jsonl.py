"""The run's JSONL file: a copy of its results stream, brought up to date under a lock, never duplicated.

`flush` appends the stream's new entries under an exclusive flock and takes its checkpoint from the stream id in the
file's own last line, so a crash between append and checkpoint cannot duplicate, and a line cut mid-write is cut off
and written again. A checkpoint the stream no longer holds (purge, a lossy restore) sets the file aside and rebuilds
it. `export` writes the complete file anew, anywhere.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import orjson
from redis.asyncio import Redis

from . import codec as codecs
from ..errors import HegelionError
from ..keys import RunKeys
from .store import _entries, jsonl_line

logger = logging.getLogger("hegelion.jsonl")

TAIL_CHUNK = 64 * 1024


def repair_tail(f: BinaryIO) -> str | None:
    """Cut a last line that a crash left without its newline; return the stream id of the last full line."""
    end = f.seek(0, os.SEEK_END)
    pos, buf = end, b""
    while pos > 0:
        step = min(TAIL_CHUNK, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
        cut = buf.rfind(b"\n")
        if cut == len(buf) - 1:  # the file ends with a newline: look for the line before it
            prev = buf.rfind(b"\n", 0, cut)
            if prev >= 0 or pos == 0:
                return _checkpoint(buf[prev + 1 : cut], f.name)
        elif cut >= 0 or pos == 0:  # a partial last line: drop it
            keep = pos + cut + 1
            logger.warning("%s: dropping a last line cut mid-write (%d bytes)", f.name, end - keep)
            f.truncate(keep)
            f.seek(0, os.SEEK_END)
            return repair_tail(f) if keep else None
    return None


def _checkpoint(line: bytes, name: str) -> str:
    try:
        return orjson.loads(line)["hegelion_trace"]["stream_id"]
    except Exception as e:
        raise HegelionError(
            f"{name}: the last line is not a sample written by hegelion-queue ({e}); move the file away "
            "and rebuild it with `hegelion-queue export`"
        ) from e


@dataclass
class Written:
    """What a flush or an export wrote: lines, and the samples it could not read (packed with a dictionary Redis
    lacks): their stream ids and the dictionaries."""

    lines: int = 0
    unreadable: list[str] = field(default_factory=list)
    missing: set[int] = field(default_factory=set)

    def warning(self) -> str:
        """One line for the user, or '' when every sample was read."""
        if not self.unreadable:
            return ""
        ids = ", ".join(self.unreadable[:5]) + (", …" if len(self.unreadable) > 5 else "")
        return (f"{len(self.unreadable)} samples could not be read (zstd dictionary "
                f"{', '.join(map(str, sorted(self.missing)))} missing from Redis; stream ids {ids}): restore it with "
                "`hegelion-queue restore-dictionary FILE`, then export again")


async def _append_from(redis: Redis, rk: RunKeys, f: BinaryIO, after: str | None, stop_at_unreadable: bool) -> Written:
    """Append every stream entry after `after` to f. An entry packed with a dictionary Redis lacks is skipped and
    reported (export), or ends the append before it (flush: the file's checkpoint stays before it, so the next flush
    writes it once the dictionary is back). A batch is written in a thread while the next is read from Redis and
    unpacked (a file write releases the GIL): the disk's time hides behind the rest."""
    out = Written()
    writing: asyncio.Future | None = None
    try:
        async for entries in _entries(redis, rk, after):
            reader = await codecs.readers(redis, rk, [fields[b"s"] for _, fields in entries])
            lines = []
            for eid, fields in entries:
                try:
                    lines.append(jsonl_line(reader, eid, fields))
                except codecs.DictionaryMissing as e:
                    out.unreadable.append(eid.decode())
                    out.missing.add(e.dict_id)
                    if stop_at_unreadable:
                        break
            if writing is not None:
                await writing
            writing = asyncio.ensure_future(asyncio.to_thread(f.write, b"".join(lines)))
            out.lines += len(lines)
            if stop_at_unreadable and out.unreadable:
                break
    finally:  # never leave a write running into a file the caller is about to close
        if writing is not None:
            await writing
    f.flush()
    os.fsync(f.fileno())
    return out


_process_locks: dict[str, asyncio.Lock] = {}


async def flush(redis: Redis, rk: RunKeys, path: Path) -> Written:
    """Bring the JSONL at `path` up to date with the run's stream; safe with any number of writers. It stops before
    a sample it cannot read (logged loudly; the next flush goes on from there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _process_locks.setdefault(str(path), asyncio.Lock())  # flock does not order tasks of one process
    async with lock:
        with open(path, "a+b") as f:
            await asyncio.to_thread(fcntl.flock, f.fileno(), fcntl.LOCK_EX)
            try:
                after = repair_tail(f)
                if after and not await redis.xrange(rk.results, min=after, max=after, count=1):
                    _set_aside(f, path)
                    after = None
                written = await _append_from(redis, rk, f, after, stop_at_unreadable=True)
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    if written.unreadable:
        logger.error("%s: stopped before %s", path, written.warning())
    return written


def _set_aside(f: BinaryIO, path: Path) -> None:
    """The stream no longer holds the file's checkpoint (`purge` and the same run name again, a restore or
    failover that lost entries): appending after it would duplicate or skip samples. The file is copied aside
    and rebuilt from the stream, which is the source of truth."""
    aside = path.with_name(f"{path.name}.stale-{int(time.time() * 1000)}")
    f.seek(0)
    with open(aside, "wb") as out:
        shutil.copyfileobj(f, out)
    f.truncate(0)
    logger.warning("%s: its last line is not in the run's stream; kept as %s and rebuilt from Redis", path, aside)


async def export(redis: Redis, rk: RunKeys, path: Path) -> Written:
    """Write the run's complete, ordered, duplicate-free JSONL to `path` (atomically replaced), and the run's zstd
    dictionary next to it (`<path>.zdict-<id>`: what restores it to a Redis that lost it). A sample that cannot be
    read is left out and reported (`Written.warning`), never the whole export."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            written = await _append_from(redis, rk, f, None, stop_at_unreadable=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    codecs.write_dictionaries(await codecs.stored_dictionaries(redis, rk), path)
    return written
