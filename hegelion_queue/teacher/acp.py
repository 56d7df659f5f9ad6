"""A pool of Agent Client Protocol (ACP) teacher processes: many sessions in each, a fresh session per prompt.

`kimi acp` (Kimi Code CLI) and any other ACP agent (Gemini CLI, the Claude Code and Codex adapters) speak JSON-RPC
2.0 over stdio: `initialize`, then per prompt `session/new` -> `session/prompt`, whose `session/update`
notifications stream the agent's message and thought chunks, and whose reply is `{stopReason}`; `session/cancel`
stops a turn. One process holds many sessions at once (Kimi Code: ~3 MB each where a process is ~400 MB), so a
worker runs `processes` processes of up to `sessions` sessions each.

A teacher, not an agent: we declare no client capabilities (no file system, no terminal), answer every
`session/request_permission` with a rejection and every other agent request with "method not found", and each
session is closed (and deleted where the agent can) once its answer is in, so no context carries over. The
teacher timeout and a cancelled job send `session/cancel`; a turn that ignores it for CANCEL_GRACE retires its
process once its other sessions end. A process that dies fails its in-flight prompts as TransientError (the job's
retry policy) and is started again, after a backoff when it keeps dying.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from .jsonrpc import Broken, RpcError, RpcProcess, track
from .process import TAIL, Answer, ConfigError, TeacherError, TransientError, provider_error

logger = logging.getLogger("hegelion.acp")

PROTOCOL_VERSION = 1
CANCEL_GRACE = 5.0  # seconds a cancelled turn, or a session's close, may take
START_BACKOFF = (0.5, 30.0)  # first and longest wait before starting a process again after one died
RECORD_WAIT = 2.0  # seconds to wait for the agent's record of a finished turn (Kimi Code: 50-200 ms)
AUTH_REQUIRED = -32000
INTERNAL_ERROR = -32603  # ACP's "authentication required": no login, or no model configured
_HTTP_STATUS = re.compile(r"(?<![\w.])([45]\d\d)(?![\w.])")


@dataclass
class Launch:
    """How one ACP process is started, and how its sessions are opened and read."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path  # the process's working directory
    session_cwd: str  # the cwd its sessions are opened with
    # the agent's own record of a session, where it keeps one (Kimi Code): its token usage, the failed turn's error
    inspect: Callable[[str], Any] | None = None  # session id -> an object with .usage, .error, .ended


Spec = Callable[[Path], Launch]  # a process's directory -> how to start it


def classify(e: RpcError, during: str = "prompt") -> TeacherError:
    """An agent's JSON-RPC error as the print mode's exit-code policy sees it: a provider's 401 / 403 / other 4xx,
    no login or no model, a method the agent does not have -> config; 429 / 5xx and the rest -> transient."""
    text = f"{e.message} {e.data if e.data is not None else ''}".strip()[-600:]
    if e.code == -32601:
        return ConfigError(f"the ACP agent does not offer {during} ({e.code}: {text[-300:]})", output=text)
    if m := _HTTP_STATUS.search(e.message):
        return provider_error(int(m.group(1)), text, text)
    if e.code == AUTH_REQUIRED:
        return ConfigError(f"the ACP agent needs a login or a model ({during}: {text[-300:]})", output=text)
    return TransientError(f"teacher error {e.code} ({during}): {text[-300:]}", output=text)


def failed_turn(error: dict[str, Any], usage: dict[str, float]) -> TeacherError:
    """A turn the agent's own record says failed (Kimi Code reports it over ACP as an empty answer)."""
    details = error.get("details") if isinstance(error.get("details"), dict) else {}
    message = f"{error.get('code') or 'error'}: {error.get('message') or ''}"
    status = details.get("statusCode")
    if isinstance(status, int):
        e = provider_error(status, message, message)
    elif str(error.get("code") or "").startswith(("auth", "provider.auth")):
        e = ConfigError(f"teacher authentication failed: {message[-300:]}", output=message)
    else:
        e = TransientError(f"teacher turn failed: {message[-300:]}", output=message)
    e.usage = usage
    return e


class _Turn:
    """What one session streamed back. The answer is the agent's message after its last tool call."""

    def __init__(self, cap: int):
        self.cap, self.size = cap, 0
        self.text: list[str] = []
        self.think: list[str] = []
        self.tool_calls = 0
        self.refused = 0  # permission requests we rejected

    def feed(self, update: dict[str, Any]) -> bool:
        """False when the output went over the cap."""
        kind = update.get("sessionUpdate")
        if kind in ("agent_message_chunk", "agent_thought_chunk"):
            content = update.get("content")
            if not isinstance(content, dict) or content.get("type") != "text":
                return True
            part = str(content.get("text") or "")
            (self.text if kind == "agent_message_chunk" else self.think).append(part)
            self.size += len(part)
            return self.size <= self.cap
        if kind == "tool_call":
            self.tool_calls += 1
            self.text = []  # what the agent said before a tool call is not the answer
        return True

    @property
    def answer(self) -> str:
        return "".join(self.text)


def _reject(options: Any) -> dict[str, Any]:
    """A permission request's answer: a reject option when the agent offers one, else cancelled."""
    for kind in ("reject_once", "reject_always"):
        for option in options if isinstance(options, list) else []:
            if isinstance(option, dict) and option.get("kind") == kind and option.get("optionId") is not None:
                return {"outcome": {"outcome": "selected", "optionId": option["optionId"]}}
    return {"outcome": {"outcome": "cancelled"}}


class AcpProcess(RpcProcess):
    """One ACP agent process and the sessions open in it."""

    def __init__(self, directory: Path, cap: int):
        super().__init__(directory, cap)
        self.turns: dict[str, _Turn] = {}
        self.capabilities: dict[str, Any] = {}
        self.agent = "ACP agent"
        self.active = 0  # sessions open (or being opened) in it
        self.stuck = 0  # sessions whose turn ignored session/cancel
        self.prompts = 0
        self.draining = False  # takes no new session; stopped when its last one ends
        self.ready = False  # initialized
        self.launch: Launch | None = None
        # Kimi Code 2.1 can fail a session/new that overlaps another session's delete ("Internal error: session not
        # found"): opening and deleting sessions take turns (prompts still run concurrently)
        self.lifecycle = asyncio.Lock()

    async def start(self, spec: Spec) -> None:
        self.launch = spec(self.dir)
        await self.spawn(self.launch.argv, self.launch.env, self.launch.cwd)
        result = await self.call("initialize", {
            "protocolVersion": PROTOCOL_VERSION,
            "clientCapabilities": {"fs": {"readTextFile": False, "writeTextFile": False}, "terminal": False},
            "clientInfo": {"name": "hegelion-queue", "version": __version__},
        })
        if not isinstance(result, dict) or not isinstance(result.get("protocolVersion"), int):
            raise self._break(f"answered initialize with {result!r:.200}", "protocol")
        if result["protocolVersion"] != PROTOCOL_VERSION:
            raise self._break(f"speaks ACP version {result['protocolVersion']}, not {PROTOCOL_VERSION}", "protocol")
        self.ready = True
        caps = result.get("agentCapabilities")
        self.capabilities = caps if isinstance(caps, dict) else {}
        info = result.get("agentInfo") if isinstance(result.get("agentInfo"), dict) else {}
        self.agent = f"{info.get('name') or 'ACP agent'} {info.get('version') or ''}".strip()
        logger.info("ACP process %d started: %s", self.pid, self.agent)

    @property
    def dead(self) -> bool:
        """Broken, or exited (a process still starting is neither)."""
        return self.broken is not None or (self.proc is not None and self.proc.returncode is not None)

    def can(self, session_method: str) -> bool:
        """Whether the agent offers session/<method> (close, delete, …)."""
        session = self.capabilities.get("sessionCapabilities")
        return isinstance(session, dict) and session.get(session_method) is not None

    # ------------------------------------------------------------ the agent's messages

    def on_notification(self, method: str, params: Any) -> None:
        if method != "session/update" or not isinstance(params, dict):
            return
        turn = self.turns.get(params.get("sessionId"))
        update = params.get("update")
        if turn is not None and isinstance(update, dict) and not turn.feed(update):
            self._break(f"output over {self.cap} bytes", "overflow")

    def on_request(self, msg: dict[str, Any]) -> None:
        method, params = msg.get("method"), msg.get("params") if isinstance(msg.get("params"), dict) else {}
        if method == "session/request_permission":
            turn = self.turns.get(params.get("sessionId"))
            if turn is not None:
                turn.refused += 1
            tool = params.get("toolCall") if isinstance(params.get("toolCall"), dict) else {}
            logger.warning("ACP process %s asked to run %r; rejected (a teacher runs no tools)", self.pid,
                           tool.get("title") or tool.get("kind") or "a tool")
            self.respond(msg.get("id"), result=_reject(params.get("options")))
            return
        logger.warning("ACP process %s sent %s; refused (no file system, no terminal)", self.pid, method)
        super().on_request(msg)

    # ------------------------------------------------------------ sessions

    async def open(self) -> str:
        assert self.launch is not None
        for attempt in range(3):
            try:
                async with self.lifecycle:
                    result = await self.call("session/new", {"cwd": self.launch.session_cwd, "mcpServers": []})
                break
            except RpcError as e:
                # still seen now and then under load: a moment later it succeeds
                if e.code != INTERNAL_ERROR or attempt == 2:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        sid = result.get("sessionId") if isinstance(result, dict) else None
        if not isinstance(sid, str) or not sid:
            raise self._break(f"answered session/new with {result!r:.200}", "protocol")
        self.turns[sid] = _Turn(self.cap)
        return sid

    def prompt(self, sid: str, text: str) -> asyncio.Future[Any]:
        return self.request("session/prompt", {"sessionId": sid, "prompt": [{"type": "text", "text": text}]})

    async def close(self, sid: str) -> None:
        """Delete the session where the agent can (its context and its history go: a delete closes it too), else
        close it."""
        self.turns.pop(sid, None)
        method = next((m for m in ("delete", "close") if self.can(m)), None)
        if method and self.alive:
            with contextlib.suppress(RpcError, Broken, asyncio.TimeoutError):
                async with self.lifecycle:
                    await asyncio.wait_for(self.call(f"session/{method}", {"sessionId": sid}), CANCEL_GRACE)


class AcpPool:
    """Up to `processes` ACP processes of up to `sessions` concurrent sessions each, started when needed."""

    def __init__(self, spec: Spec, home: Path, *, processes: int, sessions: int, recycle: int, timeout: float,
                 cap: int):
        self.spec, self.home = spec, home
        self.processes, self.sessions, self.recycle = processes, sessions, recycle
        self.timeout, self.cap = timeout, cap
        self._slots = asyncio.Semaphore(processes * sessions)  # held from session/new until its close
        self._procs: list[AcpProcess] = []
        self._starting = asyncio.Lock()
        self._deaths = 0  # processes in a row that died or failed to start: the backoff before the next start
        self._not_before = 0.0
        self._serial = itertools.count(1)
        self._finishing: set[asyncio.Task[None]] = set()
        self._stopping: set[asyncio.Task[None]] = set()
        self.started = 0  # processes started so far (tests and logs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None and p.alive]

    async def ask(self, text: str) -> Answer:
        """One prompt in a fresh session. Raises TransientError / ConfigError like the print mode."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout  # covers waiting for a slot and starting a process too

        def left() -> float:
            return max(deadline - loop.time(), 0.001)

        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout)
        except asyncio.TimeoutError:
            raise TransientError(f"teacher timed out after {self.timeout:g}s waiting for a session") from None
        proc: AcpProcess | None = None
        sid: str | None = None
        fut: asyncio.Future[Any] | None = None
        try:
            proc = await self._checkout(deadline)
            sid = await asyncio.wait_for(proc.open(), left())
            fut = proc.prompt(sid, text)
            await proc.drain()
            result = await asyncio.wait_for(asyncio.shield(fut), left())
            return await self._answer(proc, sid, result)
        except asyncio.TimeoutError:
            raise TransientError(f"teacher timed out after {self.timeout:g}s") from None
        except RpcError as e:
            raise classify(e, "session/new" if fut is None else "prompt") from None
        except Broken as e:  # the process died or spoke garbage: it is replaced, the job retried
            assert proc is not None  # a failed start is worded by _start
            raise await proc.failure(e, proc.turns[sid].answer[:TAIL] if sid in proc.turns else "") from None
        finally:  # the session is cancelled if need be, then closed, in the background: the answer does not wait
            track(self._finishing, self._finish(proc, sid, fut))

    async def _answer(self, proc: AcpProcess, sid: str, result: Any) -> Answer:
        turn = proc.turns.get(sid) or _Turn(self.cap)
        usage, error = await self._record(proc, sid)
        reason = result.get("stopReason") if isinstance(result, dict) else None
        if reason != "end_turn":
            raise TransientError(f"teacher turn ended with stopReason {reason!r}", proc.stderr_tail, turn.answer[:TAIL],
                                 usage)
        if not turn.answer.strip():
            if error is not None:
                raise failed_turn(error, usage)
            raise TransientError("teacher returned an empty answer", proc.stderr_tail, "", usage)
        self._deaths = 0
        return Answer(turn.answer, "".join(turn.think), usage)

    @staticmethod
    async def _record(proc: AcpProcess, sid: str) -> tuple[dict[str, float], dict[str, Any] | None]:
        """The session's tokens and its failed turn's error from the agent's own record, once the turn's end is
        written there (Kimi Code writes it a moment after it answers); nothing where the agent keeps none."""
        if proc.launch is None or proc.launch.inspect is None:
            return {}, None
        loop = asyncio.get_running_loop()
        give_up, pause = loop.time() + RECORD_WAIT, 0.01
        while not (record := proc.launch.inspect(sid)).ended and loop.time() < give_up:
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.2)
        return record.usage, record.error

    async def _checkout(self, deadline: float) -> AcpProcess:
        """The live process with the fewest sessions and room for one more; a new one when none has room."""
        loop = asyncio.get_running_loop()
        while True:
            for proc in [p for p in self._procs if p.dead]:
                self._retire(proc, f"broken: {proc.broken}" if proc.broken else "exited", died=True)
            ready = [p for p in self._procs if p.ready and not p.draining and p.active < self.sessions]
            if ready:
                proc = min(ready, key=lambda p: p.active)
                proc.active += 1
                proc.prompts += 1
                if proc.prompts >= self.recycle:
                    proc.draining = True  # this is its last session: its history on disk stays bounded
                return proc
            if len([p for p in self._procs if not p.draining]) < self.processes:
                async with self._starting:
                    if len([p for p in self._procs if not p.draining]) < self.processes:
                        await self._start(deadline)
                continue
            await asyncio.sleep(0.01)  # a process is starting, or a full one's session is closing
            if loop.time() > deadline:
                raise asyncio.TimeoutError

    async def _start(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        wait = self._not_before - time.monotonic()
        if wait > 0:  # it kept dying: do not spin
            if loop.time() + wait > deadline:
                raise TransientError(f"the teacher process keeps dying; next start in {wait:.0f}s")
            await asyncio.sleep(wait)
        proc = AcpProcess(self.home / f"acp-{next(self._serial)}", self.cap)
        self._procs.append(proc)
        try:
            await asyncio.wait_for(proc.start(self.spec), max(deadline - loop.time(), 0.001))
        except BaseException as e:
            self._retire(proc, "failed to start", died=True)
            if not isinstance(e, (Broken, RpcError, asyncio.TimeoutError)):
                raise  # FileNotFoundError, PermissionError (the Teacher words them), cancellation
            refused = "the ACP agent refused initialize ({e})"
            raise await proc.start_error(e, self.timeout, "the ACP agent", refused) from None
        self.started += 1

    def _died(self) -> None:
        self._deaths += 1
        first, longest = START_BACKOFF
        self._not_before = time.monotonic() + min(longest, first * 2 ** (self._deaths - 1))

    async def _finish(self, proc: AcpProcess | None, sid: str | None, fut: asyncio.Future[Any] | None) -> None:
        """Owns the session and its slot once `ask` is done with it: cancel a turn still running, close the session,
        give the slot back; a turn that ignores the cancel retires its process once its other sessions end."""
        try:
            if proc is None:
                return
            if fut is not None and not fut.done() and sid is not None and proc.alive:
                with contextlib.suppress(Broken):
                    proc.notify("session/cancel", {"sessionId": sid})
                    await proc.drain()
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(fut), CANCEL_GRACE)
                if not fut.done():
                    proc.stuck += 1
                    proc.draining = True
                    logger.warning("ACP process %s: a turn ignored session/cancel for %gs; the process retires",
                                   proc.pid, CANCEL_GRACE)
            if sid is not None:
                await proc.close(sid)
        finally:
            if proc is not None:
                proc.active -= 1
                if not proc.alive:
                    self._retire(proc, f"broken: {proc.broken}", died=True)
                elif proc.draining and proc.active <= proc.stuck:
                    self._retire(proc, "recycled" if not proc.stuck else "a turn ignored session/cancel")
            self._slots.release()

    def _retire(self, proc: AcpProcess, why: str, died: bool = False) -> None:
        """Kill now; reap and remove its directory in the background. A process that died makes the next start
        wait (the backoff grows while they keep dying)."""
        if proc not in self._procs:
            return
        logger.info("ACP process %s retired: %s", proc.pid, why)
        self._procs.remove(proc)
        if died:
            self._died()
        proc._break(why, "exit")
        track(self._stopping, proc.stop())

    async def close(self) -> None:
        """Kill every process (the worker's shutdown), once the sessions already answered are closed; asks still
        running fail as transient."""
        if self._finishing:
            await asyncio.wait(set(self._finishing), timeout=2 * CANCEL_GRACE)
        for proc in list(self._procs):
            self._retire(proc, "pool closed")
        await asyncio.gather(*self._finishing, *self._stopping, return_exceptions=True)
