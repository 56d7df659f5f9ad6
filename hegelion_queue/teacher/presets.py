"""The teacher: run a CLI model without a shell, the prompt on stdin or in a protocol message, bounded in time
and output.

One way to start a teacher process (`process.spawn`: no shell, own process group, PR_SET_PDEATHSIG) serves every
protocol; what differs is only argv, environment and how the answer is read:
- `acp`: sessions in long-lived Agent Client Protocol processes (`acp.py`): `kimi acp` (Kimi Code, 2.x), or any
  ACP agent (HEGELION_TEACHER=acp with HEGELION_ACP_COMMAND);
- `wire`: a pool of long-lived `kimi --wire` processes, one per job slot (`wire.py`; kimi-cli 1.x);
- `print`: one process per prompt (`kimi --print` / `kimi -p`, and the command preset).
HEGELION_KIMI_MODE=auto picks acp for Kimi Code and wire for kimi-cli by `kimi --version` (`kimi.py`, which
also gives each kimi process a private home that sees the user's own login). Exit-code policy: 0 parse; 75 /
timeout / empty answer -> TransientError (retried); 1 / 2 / binary not found -> ConfigError (dead letter, and a
run-wide circuit breaker after several).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import orjson

from . import kimi as kimi_setup
from .. import redact
from .acp import AcpPool, Launch
from ..dialectic import TEACHER_PROMPT, frame
from .wire import WirePool
from .process import TAIL, Answer, ConfigError, TeacherError, TransientError, provider_error, run_process
from ..settings import Settings

__all__ = ["Answer", "ConfigError", "Teacher", "TeacherError", "TransientError", "parse_kimi_stream", "run_process"]

logger = logging.getLogger("hegelion.teacher")

RESUME_HINT = "To resume this session"  # what kimi --print writes to stderr on every run
ARGV_PROMPT_MAX = 100 * 1024  # Kimi Code's -p takes the prompt on argv (Linux caps one argument at 128 KiB)


# ---------------------------------------------------------------- reading answers


def parse_kimi_stream(stdout: str) -> Answer:
    """kimi --print / kimi -p --output-format stream-json: one JSON message a line; the answer is the last
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


def write_agent_file(directory: Path) -> Path:
    """A kimi-cli agent with no tools at all (print mode would otherwise run tool calls unasked)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "system.md").write_text(TEACHER_PROMPT + "\n", encoding="utf-8")
    agent = directory / "agent.yaml"
    agent.write_text(
        "version: 1\nagent:\n  name: hegelion-teacher\n  system_prompt_path: ./system.md\n  tools: []\n",
        encoding="utf-8",
    )
    return agent


# ---------------------------------------------------------------- which teacher


def kimi_protocol(s: Settings) -> str:
    """acp / wire / print for the kimi preset: HEGELION_KIMI_MODE, or by `kimi --version` (2.x: Kimi Code)."""
    if s.kimi_mode != "auto":
        return s.kimi_mode
    return "acp" if kimi_setup.is_kimi_code(s.kimi_bin) else "wire"


def teacher_model(s: Settings) -> str:
    """The model the settings select (kimi's --model, the endpoint's, or the user's login default); for the command
    and acp presets, their command line."""
    if s.teacher == "command":
        return redact.command(s.teacher_cmd)  # it lands in every sample's trace: no key on a command line goes along
    if s.teacher == "acp":
        return redact.command(s.acp_command)
    env = dict(os.environ)
    found = kimi_setup.kimi_code_model(env) if kimi_setup.is_kimi_code(s.kimi_bin) else kimi_setup.kimi_cli_model(env)
    return s.kimi_model or found or "kimi-default"


# ---------------------------------------------------------------- the teacher


@dataclass
class PrintCall:
    """One process per prompt: its argv, stdin and environment, and how to read what it says."""

    argv: list[str]
    stdin: bytes
    env: dict[str, str]
    parse: Callable[[str], Answer]
    failure: Callable[[int, str, str], TeacherError]  # (exit code, stderr, stdout) -> the error
    scratch: Path | None = None  # a private home of this call's own, removed after it


class Teacher:
    """One worker's teacher: its protocol, its scratch dir and its long-lived processes (acp, wire). The protocol is
    decided at the first `ask` (the kimi preset may need `kimi --version`); call `close()` when done."""

    def __init__(self, settings: Settings, home: Path):
        self.settings = settings
        self.home = home
        self.work_dir = home / "work"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.agent_file = write_agent_file(home / "agent")
        self.pool: WirePool | AcpPool | None = None
        self.protocol = self._known_protocol()
        if self.protocol is not None:
            self._make_pool(self.protocol)
        self._ready: asyncio.Lock | None = None
        self._checked = False

    @property
    def model(self) -> str:
        return teacher_model(self.settings)

    @property
    def binary(self) -> str:
        s = self.settings
        argv = shlex.split(s.teacher_cmd if s.teacher == "command" else s.acp_command) if s.teacher != "kimi" else []
        return s.kimi_bin if s.teacher == "kimi" else (argv[0] if argv else "")

    def _known_protocol(self) -> str | None:
        """The protocol when the settings alone say it (else `kimi --version` decides, at the first ask)."""
        s = self.settings
        if s.teacher == "command":
            return "print"
        if s.teacher == "acp":
            return "acp"
        return None if s.kimi_mode == "auto" else s.kimi_mode

    def _make_pool(self, protocol: str) -> None:
        s = self.settings
        if protocol == "acp":
            self.pool = AcpPool(self._acp_launch, self.home / "acp", processes=s.acp_processes,
                                sessions=s.acp_slots(), recycle=s.acp_recycle, timeout=s.teacher_timeout,
                                cap=s.teacher_output_cap)
        elif protocol == "wire":
            self.pool = WirePool(self._wire_spec, self.home / "wire", size=s.max_jobs, recycle=s.kimi_recycle,
                                 timeout=s.teacher_timeout, cap=s.teacher_output_cap)

    async def _prepare(self) -> None:
        """Once: the protocol (asking `kimi --version` when need be), checked against the kimi that is installed."""
        if self._ready is None:
            self._ready = asyncio.Lock()
        async with self._ready:
            if self._checked:
                return
            s = self.settings
            if s.teacher == "acp" and not shlex.split(s.acp_command):
                raise ConfigError("HEGELION_TEACHER=acp needs HEGELION_ACP_COMMAND, e.g. 'gemini --experimental-acp'")
            if self.protocol is None:
                self.protocol = await asyncio.to_thread(kimi_protocol, s)
                self._make_pool(self.protocol)
            if s.teacher == "kimi":
                await self._check_kimi(self.protocol)
            self._checked = True
            logger.info("teacher: %s over %s (model %s)", s.teacher, self.protocol, self.model)

    async def _check_kimi(self, protocol: str) -> None:
        """Kimi Code has no wire mode; kimi-cli's own ACP server is not a teacher (DESIGN: full-tool agent)."""
        version = await asyncio.to_thread(kimi_setup.kimi_version, self.settings.kimi_bin)
        code = kimi_setup.major(version)
        if code is not None and code >= 2 and protocol == "wire":
            raise ConfigError(f"{self.settings.kimi_bin} is Kimi Code {version}, which has no wire mode: set "
                              "HEGELION_KIMI_MODE=acp (or auto)")
        if code == 1 and protocol == "acp":
            raise ConfigError(f"{self.settings.kimi_bin} is kimi-cli ({version}): its ACP server is not a teacher; set "
                              "HEGELION_KIMI_MODE=wire (or auto), or install Kimi Code with `make kimi`")

    # ------------------------------------------------------------ how each protocol starts its processes

    def _kimi_cli_flags(self, work_dir: Path, share: Path) -> list[str]:
        s = self.settings
        argv = ["--agent-file", str(self.agent_file), "--work-dir", str(work_dir)]
        argv += kimi_setup.kimi_cli_share(share, dict(os.environ), s.kimi_config_file)
        if s.kimi_model:
            argv += ["--model", s.kimi_model]
        return argv

    def _kimi_cli_env(self, share: Path) -> dict[str, str]:
        env = dict(os.environ)
        env["KIMI_SHARE_DIR"] = str(share)
        env.setdefault("KIMI_DISABLE_TELEMETRY", "1")
        env.setdefault("KIMI_CLI_NO_AUTO_UPDATE", "1")
        return env

    def _wire_spec(self, directory: Path) -> tuple[list[str], dict[str, str], Path]:
        """argv, environment and work dir of one long-lived `kimi --wire` with its own share dir."""
        work = directory / "work"
        work.mkdir(parents=True, exist_ok=True)
        share = directory / "share"
        argv = [self.settings.kimi_bin, "--wire", *self._kimi_cli_flags(work, share)]
        return argv, self._kimi_cli_env(share), work

    def _acp_launch(self, directory: Path) -> Launch:
        """One ACP process: `kimi acp` with a private KIMI_CODE_HOME, or the acp preset's command."""
        work = directory / "work"
        work.mkdir(parents=True, exist_ok=True)
        if self.settings.teacher == "acp":
            return Launch(shlex.split(self.settings.acp_command), dict(os.environ), work, str(work))
        env = dict(os.environ)
        home = kimi_setup.kimi_code_home(directory / "home", env)
        return Launch([self.settings.kimi_bin, "acp"], kimi_setup.kimi_code_env(home, env), work,
                      kimi_setup.kimi_code_session_cwd(work), inspect=lambda sid: kimi_setup.kimi_code_session(home, sid))

    def _print_call(self, prompt: str) -> PrintCall:
        s = self.settings
        if s.teacher == "command":
            argv = shlex.split(s.teacher_cmd)  # split like a shell would, but no shell ever runs it
            if not argv:
                raise ConfigError("HEGELION_TEACHER=command needs HEGELION_TEACHER_CMD, e.g. 'llm -m gpt-4o-mini'")
            return PrintCall(argv, frame(prompt).encode("utf-8"), dict(os.environ), lambda out: Answer(out.strip()),
                             _exit_policy((2, 126, 127)))
        if kimi_setup.is_kimi_code(s.kimi_bin):  # Kimi Code: -p takes argv only
            text = frame(prompt)
            if len(text.encode("utf-8")) > ARGV_PROMPT_MAX:
                raise ConfigError(f"a prompt over {ARGV_PROMPT_MAX} bytes cannot go on Kimi Code's command line "
                                  "(kimi -p): use HEGELION_KIMI_MODE=acp")
            env = dict(os.environ)
            home = kimi_setup.kimi_code_home(Path(tempfile.mkdtemp(prefix="kimi-code-", dir=self.home)), env)
            argv = [s.kimi_bin, "-p", text, "--output-format", "stream-json"]
            argv += ["--model", s.kimi_model] if s.kimi_model else []
            return PrintCall(argv, b"", kimi_setup.kimi_code_env(home, env), parse_kimi_stream, _kimi_code_exit,
                             scratch=home)
        share = self.home / "share"
        argv = [s.kimi_bin, "--print", "--output-format", "stream-json", *self._kimi_cli_flags(self.work_dir, share)]
        return PrintCall(argv, frame(prompt).encode("utf-8"), self._kimi_cli_env(share), parse_kimi_stream,
                         _exit_policy((1, 2)))

    # ------------------------------------------------------------ asking

    async def close(self) -> None:
        """Stop the long-lived teacher processes (the worker's shutdown)."""
        if self.pool is not None:
            await self.pool.close()

    async def ask(self, prompt: str) -> Answer:
        try:
            await self._prepare()
            if isinstance(self.pool, AcpPool):
                text = frame(prompt) if self.settings.teacher == "kimi" else f"{TEACHER_PROMPT}\n\n{frame(prompt)}"
                return await self.pool.ask(text)
            if self.pool is not None:
                return await self.pool.ask(frame(prompt))
            return await self._ask_once(prompt)
        except FileNotFoundError as e:
            if self.settings.teacher == "kimi":
                raise ConfigError(f"teacher binary {self.settings.kimi_bin!r} not found ({e}): run `make kimi` "
                                  "(Kimi Code into .kimi-code, used automatically) or set HEGELION_KIMI_BIN") from e
            raise ConfigError(f"teacher binary {self.binary!r} not found ({e}): install it or fix "
                              f"HEGELION_{'TEACHER_CMD' if self.settings.teacher == 'command' else 'ACP_COMMAND'}") from e
        except PermissionError as e:
            raise ConfigError(f"teacher binary {self.binary!r} is not executable ({e})") from e

    async def _ask_once(self, prompt: str) -> Answer:
        """One process per prompt (print mode, and the command preset)."""
        call = self._print_call(prompt)
        try:
            r = await run_process(call.argv, call.stdin, timeout=self.settings.teacher_timeout,
                                  cap=self.settings.teacher_output_cap, env=call.env, cwd=self.work_dir)
        finally:
            if call.scratch is not None:
                shutil.rmtree(call.scratch, ignore_errors=True)
        out = r.stdout.decode("utf-8", "replace")
        err = r.stderr.decode("utf-8", "replace")
        if r.timed_out:
            raise TransientError(f"teacher timed out after {self.settings.teacher_timeout:g}s")
        if r.overflow:
            raise TransientError(f"teacher output over {self.settings.teacher_output_cap} bytes", err, out[:TAIL])
        if r.returncode != 0:
            raise call.failure(r.returncode, err, out)
        answer = call.parse(out)
        if not answer.text.strip():
            raise TransientError("teacher returned an empty answer", err, out)
        return answer


def _exit_policy(config_exits: tuple[int, ...]) -> Callable[[int, str, str], TeacherError]:
    """kimi-cli and the command preset: these exit codes mean "fix the set-up"; any other non-zero is transient."""

    def failure(rc: int, err: str, out: str) -> TeacherError:
        said = "\n".join(x for x in err.splitlines() if x.strip() and not x.startswith(RESUME_HINT))
        tail = (said or out.strip())[-300:]  # kimi-cli prints its error on stdout, a resume hint on stderr
        msg = f"teacher exited {rc}: {tail}"
        return (ConfigError if rc in config_exits else TransientError)(msg, err, out)  # 75: rate limit, 5xx, a crash

    return failure


def _kimi_code_exit(rc: int, err: str, out: str) -> TeacherError:
    """Kimi Code's -p exits 1 for every failure and says which on stderr ("error: failed to run prompt:
    provider.rate_limit: 429 …", "… No model configured …")."""
    said = next((x for x in err.splitlines() if x.startswith("error:")), err.strip()[-300:])
    if m := re.search(r"provider\.\w+: (\d{3})\b", said):
        e = provider_error(int(m.group(1)), said, out)
        e.stderr_tail = err[-TAIL:]
        return e
    if re.search(r"No model configured|/login|auth", said, re.IGNORECASE) or rc == 2:
        return ConfigError(f"teacher exited {rc}: {said[-300:]}", err, out)
    return TransientError(f"teacher exited {rc}: {said[-300:]}", err, out)
