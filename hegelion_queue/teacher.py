"""The teacher: run a CLI model without a shell, prompt on stdin, bounded in time and output.

One way to start a teacher process (`spawn`: no shell, own process group, PR_SET_PDEATHSIG) and one
runner of a process per prompt (`run_process`) serve every preset; presets differ only in argv,
environment and how they read stdout. The kimi preset runs by default as a pool of long-lived
`kimi --wire` processes instead (`kimi_wire.py`, HEGELION_KIMI_MODE=wire|print). Exit-code policy:
0 parse; 75 / timeout / empty answer -> TransientError (retried); 1 / 2 / binary not found ->
ConfigError (dead letter, and a run-wide circuit breaker after several).
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import orjson

from .dialectic import TEACHER_PROMPT, frame
from .kimi_wire import WirePool
from .process import TAIL, Answer, ConfigError, TeacherError, TransientError, run_process
from .settings import Settings

__all__ = ["Answer", "ConfigError", "Teacher", "TeacherError", "TransientError", "parse_kimi_stream", "run_process"]

logger = logging.getLogger("hegelion.teacher")

RESUME_HINT = "To resume this session"  # what kimi --print writes to stderr on every run


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


def teacher_model(s: Settings) -> str:
    """The model the settings select: kimi's --model or KIMI_MODEL_NAME; the command preset's command line."""
    if s.teacher == "kimi":
        return s.kimi_model or os.environ.get("KIMI_MODEL_NAME", "") or "kimi-default"
    return s.teacher_cmd


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
            self.pool = WirePool(
                self._wire_spec, home / "wire", size=settings.max_jobs, recycle=settings.kimi_recycle,
                timeout=settings.teacher_timeout, cap=settings.teacher_output_cap,
            )

    @property
    def model(self) -> str:
        return teacher_model(self.settings)

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
