"""The teacher: run a CLI model without a shell, prompt on stdin, bounded in time and output.

One way to start a teacher process (`spawn`: no shell, own process group, PR_SET_PDEATHSIG) and one
runner of a process per prompt (`run_process`) serve every preset; presets differ only in argv,
environment and how they read stdout. The kimi preset runs by default as a pool of long-lived
`kimi --wire` processes instead (`kimi_wire.py`, HEGELION_KIMI_MODE=wire|print). Exit-code policy:
0 parse; 75 / timeout / empty answer -> TransientError (retried); 1 / 2 / binary not found ->
ConfigError (dead letter, and a run-wide circuit breaker after several).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import orjson

from .dialectic import TEACHER_PROMPT, frame
from .settings import Settings

if TYPE_CHECKING:
    from .kimi_wire import WirePool

logger = logging.getLogger("hegelion.teacher")

TAIL = 2000  # characters of stderr kept in errors and dead letters
RESUME_HINT = "To resume this session"  # what kimi --print writes to stderr on every run
READ_CHUNK = 64 * 1024


class TeacherError(Exception):
    def __init__(self, message: str, stderr: str = "", output: str = ""):
        super().__init__(message)
        self.stderr_tail = stderr[-TAIL:]
        self.output = output


class TransientError(TeacherError):
    """Worth another try later: rate limit, server error, timeout, empty or malformed answer."""


class ConfigError(TeacherError):
    """Will fail the same way every time until the user fixes the set-up."""


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


def _pdeathsig() -> None:  # fallback where setpriv is missing; forces Python's slower fork path
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def _spawn_args(argv: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """SIGKILL the child when the worker dies (no orphan spending credits): setpriv sets PR_SET_PDEATHSIG
    and execs, which keeps the fast spawn path; preexec_fn is the fallback."""
    if _SETPRIV:
        return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv], None
    if sys.platform.startswith("linux"):
        return argv, _pdeathsig
    return argv, None


def kill_group(proc: asyncio.subprocess.Process) -> None:
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
    args, preexec = _spawn_args(argv)
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


# ---------------------------------------------------------------- presets


def parse_kimi_stream(stdout: str) -> Answer:
    """kimi --print --output-format stream-json: one JSON message a line; the answer is the last
    assistant message's text, its `think` parts are the model's reasoning."""
    last: dict[str, Any] | None = None
    usage: dict[str, Any] = {}
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            msg = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(msg, dict):
            continue
        if isinstance(msg.get("usage"), dict):
            usage = msg["usage"]
        if msg.get("role") == "assistant":
            last = msg
    if last is None:
        return Answer("")
    content = last.get("content")
    if isinstance(content, str):
        return Answer(content, usage=usage)
    texts, thoughts = [], []
    for part in content or []:
        if isinstance(part, dict):
            if part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif part.get("type") == "think":
                thoughts.append(str(part.get("think", "")))
    return Answer("".join(texts), "".join(thoughts), usage)


@dataclass
class Preset:
    name: str
    argv: Callable[["Teacher"], list[str]]
    parse: Callable[[str], Answer]
    config_exits: tuple[int, ...]  # exit codes that mean "fix the set-up"; any other non-zero is transient


def _kimi_flags(t: "Teacher", work_dir: Path) -> list[str]:
    s = t.settings
    argv = ["--agent-file", str(t.agent_file), "--work-dir", str(work_dir)]
    if s.kimi_config_file:
        argv += ["--config-file", s.kimi_config_file]
    if s.kimi_model:
        argv += ["--model", s.kimi_model]
    return argv


def _kimi_argv(t: "Teacher") -> list[str]:
    return [t.settings.kimi_bin, "--print", "--output-format", "stream-json", *_kimi_flags(t, t.work_dir)]


def _command_argv(t: "Teacher") -> list[str]:
    argv = shlex.split(t.settings.teacher_cmd)  # split like a shell would, but no shell ever runs it
    if not argv:
        raise ConfigError("HEGELION_TEACHER=command needs HEGELION_TEACHER_CMD, e.g. 'llm -m gpt-4o-mini'")
    return argv


PRESETS = {
    "kimi": Preset("kimi", _kimi_argv, parse_kimi_stream, config_exits=(1, 2)),
    "command": Preset("command", _command_argv, lambda out: Answer(out.strip()), config_exits=(2, 126, 127)),
}


def write_agent_file(directory: Path) -> Path:
    """A kimi agent with no tools at all (print mode would otherwise run tool calls unasked)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "system.md").write_text(TEACHER_PROMPT + "\n", encoding="utf-8")
    agent = directory / "agent.yaml"
    agent.write_text(
        "version: 1\nagent:\n  name: hegelion-teacher\n  system_prompt_path: ./system.md\n  tools: []\n",
        encoding="utf-8",
    )
    return agent


class Teacher:
    """One worker's teacher: its preset, its own kimi share dir and scratch work dir. The kimi preset
    in wire mode (the default) keeps a pool of long-lived kimi processes, one per job slot; call
    `close()` when done with it."""

    def __init__(self, settings: Settings, home: Path):
        self.settings = settings
        self.preset = PRESETS[settings.teacher]
        self.home = home
        self.work_dir = home / "work"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.agent_file = write_agent_file(home / "agent")
        self.pool: WirePool | None = None
        if self.preset.name == "kimi" and settings.kimi_mode == "wire":
            from .kimi_wire import WirePool  # imports this module's runner and errors

            self.pool = WirePool(
                self._wire_spec, home / "wire", size=settings.max_jobs, recycle=settings.kimi_recycle,
                timeout=settings.teacher_timeout, cap=settings.teacher_output_cap,
            )

    @property
    def model(self) -> str:
        s = self.settings
        if self.preset.name == "kimi":
            return s.kimi_model or os.environ.get("KIMI_MODEL_NAME", "") or "kimi-default"
        return s.teacher_cmd

    def env(self, share_dir: Path | None = None) -> dict[str, str]:
        env = dict(os.environ)
        if self.preset.name == "kimi":
            env["KIMI_SHARE_DIR"] = str(share_dir or self.home / "share")
            env.setdefault("KIMI_DISABLE_TELEMETRY", "1")
            env.setdefault("KIMI_CLI_NO_AUTO_UPDATE", "1")
        return env

    def _wire_spec(self, directory: Path) -> tuple[list[str], dict[str, str], Path]:
        """argv, environment and work dir of one long-lived `kimi --wire` with its own share dir."""
        work = directory / "work"
        work.mkdir(parents=True, exist_ok=True)
        argv = [self.settings.kimi_bin, "--wire", *_kimi_flags(self, work)]
        return argv, self.env(directory / "share"), work

    async def close(self) -> None:
        """Stop the long-lived teacher processes (the worker's shutdown)."""
        if self.pool is not None:
            await self.pool.close()

    async def ask(self, prompt: str) -> Answer:
        try:
            if self.pool is not None:
                return await self.pool.ask(frame(prompt))
            return await self._ask_once(prompt)
        except FileNotFoundError as e:
            if self.preset.name == "kimi":
                raise ConfigError(f"teacher binary {self.settings.kimi_bin!r} not found ({e}): run `make kimi` "
                                  "(kimi-cli 1.51.0 into .kimi-venv, used automatically) or set HEGELION_KIMI_BIN") from e
            raise ConfigError(f"teacher binary {self.preset.argv(self)[0]!r} not found ({e}): install it or fix "
                              "HEGELION_TEACHER_CMD") from e
        except PermissionError as e:
            binary = self.settings.kimi_bin if self.preset.name == "kimi" else self.preset.argv(self)[0]
            raise ConfigError(f"teacher binary {binary!r} is not executable ({e})") from e

    async def _ask_once(self, prompt: str) -> Answer:
        """One process per prompt (print mode, and the command preset)."""
        argv = self.preset.argv(self)
        r = await run_process(
            argv,
            frame(prompt).encode("utf-8"),
            timeout=self.settings.teacher_timeout,
            cap=self.settings.teacher_output_cap,
            env=self.env(),
            cwd=self.work_dir,
        )
        out = r.stdout.decode("utf-8", "replace")
        err = r.stderr.decode("utf-8", "replace")
        if r.timed_out:
            raise TransientError(f"teacher timed out after {self.settings.teacher_timeout:g}s")
        if r.overflow:
            raise TransientError(f"teacher output over {self.settings.teacher_output_cap} bytes", err, out[:TAIL])
        if r.returncode != 0:
            said = "\n".join(x for x in err.splitlines() if x.strip() and not x.startswith(RESUME_HINT))
            tail = (said or out.strip())[-300:]  # kimi prints its error on stdout, a resume hint on stderr
            msg = f"teacher exited {r.returncode}: {tail}"
            if r.returncode in self.preset.config_exits:
                raise ConfigError(msg, err, out)
            raise TransientError(msg, err, out)  # 75 (rate limit, 5xx), a crash or a signal
        answer = self.preset.parse(out)
        if not answer.text.strip():
            raise TransientError("teacher returned an empty answer", err, out)
        return answer
