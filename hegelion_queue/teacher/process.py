"""Teacher processes and what every teacher says back: the errors, the answer, and the one way to start
a process (no shell, own process group, PR_SET_PDEATHSIG) and run it once. `presets.py` (a process per prompt),
`jsonrpc.py` and the pools above it (`wire.py`, `acp.py`: long-lived processes) build on this module.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

TAIL = 2000  # characters of stderr kept in errors and dead letters
READ_CHUNK = 64 * 1024


class TeacherError(Exception):
    def __init__(self, message: str, stderr: str = "", output: str = "", usage: dict[str, Any] | None = None):
        super().__init__(message)
        self.stderr_tail = stderr[-TAIL:]
        self.output = output
        self.usage = usage or {}  # tokens the failed call spent, where the teacher said (budgets count them too)


class TransientError(TeacherError):
    """Worth another try later: rate limit, server error, timeout, empty or malformed answer."""


class ConfigError(TeacherError):
    """Will fail the same way every time until the user fixes the set-up."""


RETRY_STATUSES = (408, 409, 425, 429)  # 4xx statuses that are worth another try; every 5xx is too


def provider_error(status: int, message: str, output: str = "") -> TeacherError:
    """A provider's HTTP error as the exit-code policy sees it: 401, 403 and other 4xx -> fix the set-up;
    408 / 409 / 425 / 429 and 5xx -> retry."""
    if 400 <= status < 500 and status not in RETRY_STATUSES:
        return ConfigError(f"teacher provider error {status}: {message[-300:]}", output=output)
    return TransientError(f"teacher provider error {status}: {message[-300:]}", output=output)


@dataclass
class ProcessResult:
    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    overflow: bool = False
    seconds: float = 0.0


@dataclass
class Answer:
    text: str
    reasoning: str = ""
    usage: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- the one process runner


def _pdeathsig(sig: int = signal.SIGKILL) -> None:  # fallback where setpriv is missing; slower fork path
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, sig)  # PR_SET_PDEATHSIG


_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


Preexec = Callable[[], None] | None


def pdeathsig_args(argv: list[str], sig: signal.Signals = signal.SIGKILL) -> tuple[list[str], Preexec]:
    """argv and preexec_fn that make `sig` reach the child when its parent dies (no orphan spending credits):
    setpriv sets PR_SET_PDEATHSIG and execs, which keeps the fast spawn path; preexec_fn is the fallback."""
    if _SETPRIV:
        return [_SETPRIV, "--pdeathsig", sig.name[3:], "--", *argv], None
    if sys.platform.startswith("linux"):
        return argv, lambda: _pdeathsig(sig)
    return argv, None


def kill_group(proc: asyncio.subprocess.Process | subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (its own session: pgid == pid), its children too."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def spawn(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    stderr: int = asyncio.subprocess.PIPE,
    limit: int = 2**16,
) -> asyncio.subprocess.Process:
    """Start argv (never a shell) with pipes, in its own session and process group, with PR_SET_PDEATHSIG.
    Raises FileNotFoundError when the binary is missing. The one way this project starts a teacher."""
    args, preexec = pdeathsig_args(argv)
    if _SETPRIV and not shutil.which(argv[0]):
        raise FileNotFoundError(argv[0])
    return await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=preexec,
        limit=limit,
    )


async def run_process(
    argv: list[str],
    stdin: bytes,
    *,
    timeout: float,
    cap: int,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> ProcessResult:
    """Run argv once, prompt on stdin; the group is killed on timeout, on output over `cap` bytes and
    on cancellation. Raises FileNotFoundError when the binary is missing."""
    t0 = time.monotonic()
    proc = await spawn(argv, env=env, cwd=cwd)
    overflow = False

    async def read(stream: asyncio.StreamReader, limit: int) -> bytes:
        nonlocal overflow
        buf = bytearray()
        while chunk := await stream.read(READ_CHUNK):
            buf += chunk
            if len(buf) > limit:
                overflow = True
                kill_group(proc)
                return bytes(buf[:limit])
        return bytes(buf)

    async def feed() -> None:
        try:
            proc.stdin.write(stdin)
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the CLI exited without reading everything; its exit code tells why
        finally:
            proc.stdin.close()

    try:
        out, err, _ = await asyncio.wait_for(
            asyncio.gather(read(proc.stdout, cap), read(proc.stderr, cap), feed()), timeout
        )
        rc = await asyncio.wait_for(proc.wait(), timeout)
    except asyncio.TimeoutError:
        kill_group(proc)
        await proc.wait()
        return ProcessResult(None, b"", b"", timed_out=True, seconds=time.monotonic() - t0)
    except BaseException:  # cancelled (SIGTERM drain, abort): take the whole group down with us
        kill_group(proc)
        raise
    if overflow:
        await proc.wait()
    return ProcessResult(rc, out, err, overflow=overflow, seconds=time.monotonic() - t0)
