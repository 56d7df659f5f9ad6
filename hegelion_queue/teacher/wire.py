"""A pool of long-lived `kimi --wire` processes: JSON-RPC 2.0 over stdio, one turn at a time each.

A fresh `kimi --print` burns 3-4 CPU-seconds before it sends a byte; one wire process answers prompt
after prompt for about 0.04 CPU-s each. Per prompt: `prompt` -> collect `ContentPart` text and think
parts and `StatusUpdate` token usage -> `{"status": "finished"}`; then `/clear`, checked by its
acknowledgement, so the next prompt starts from an empty context (kimi keeps even a failed turn's
message). The guarantees of a process per prompt hold: every process is started by `teacher.spawn` (no
shell, own process group, PR_SET_PDEATHSIG) with its own KIMI_SHARE_DIR and work dir; the teacher
timeout and a cancelled job `cancel` the turn, and a turn that does not end within CANCEL_GRACE gets
its process killed and replaced; a process that exits or writes anything but our protocol is replaced
and the prompt fails as a TransientError (the job's retry policy); a process is replaced after
`recycle` prompts, which bounds its on-disk history (kimi rotates a context file per /clear).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from .jsonrpc import Broken, RpcError, RpcProcess, track
from .process import TAIL, Answer, ConfigError, TeacherError, TransientError, provider_error

logger = logging.getLogger("hegelion.kimi_wire")

PROTOCOL_VERSION = "1.10"  # kimi-cli 1.51.0
CLEARED = "The context has been cleared."  # kimi's acknowledgement of /clear
CANCEL_GRACE = 5.0  # seconds a cancelled turn, or a /clear, may take before its process is replaced
CONFIG_CODES = {-32001: "LLM not set", -32002: "LLM not supported", -32004: "authentication expired"}
PROTOCOL_CODES = {-32700, -32600, -32601, -32602}  # we sent something kimi does not understand
_STATUS = re.compile(r"\bError code: (\d{3})\b")  # how kimi's provider errors name the HTTP status

Spec = Callable[[Path], tuple[list[str], dict[str, str], Path]]  # process dir -> argv, env, work dir
WireError = RpcError  # kimi's JSON-RPC error replies


def classify(e: WireError) -> TeacherError:
    """A JSON-RPC error as the print mode's exit-code policy sees it: 429 / 5xx / empty answer /
    connection -> transient (exit 75); LLM not set, other 4xx, protocol errors -> config (exit 1/2)."""
    if e.code in CONFIG_CODES:
        return ConfigError(f"{CONFIG_CODES[e.code]} (kimi error {e.code}: {e.message[-300:]})", output=e.message)
    if e.code in PROTOCOL_CODES:
        return ConfigError(f"kimi rejected a wire request ({e.code}: {e.message[-300:]}); is it kimi-cli 1.51?")
    if e.code == -32003 and (m := _STATUS.search(e.message)):
        if isinstance(error := provider_error(int(m.group(1)), e.message, e.message), ConfigError):
            return error
    return TransientError(f"teacher error {e.code}: {e.message[-300:]}", output=e.message)


class _Turn:
    """What one `prompt` streamed back. The answer is the last step's message, as in print mode."""

    def __init__(self, cap: int):
        self.cap, self.size = cap, 0
        self.text: list[str] = []
        self.think: list[str] = []
        self.usage: dict[str, float] = {}
        self.statuses: list[dict[str, Any]] = []

    def feed(self, kind: Any, payload: dict[str, Any]) -> bool:
        """False when the output went over the cap."""
        if kind == "StepBegin":
            self.text, self.think = [], []
        elif kind == "ContentPart":
            if payload.get("type") == "text":
                part = str(payload.get("text") or "")
                self.text.append(part)
            elif payload.get("type") == "think":
                part = str(payload.get("think") or "")
                self.think.append(part)
            else:
                return True
            self.size += len(part)
            return self.size <= self.cap
        elif kind == "StatusUpdate":
            self.statuses.append(payload)
            for k, v in (payload.get("token_usage") or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.usage[k] = self.usage.get(k, 0) + v
        return True

    @property
    def answer(self) -> str:
        return "".join(self.text)


class WireProcess(RpcProcess):
    """One `kimi --wire`: our requests, its responses, its events for the turn in flight."""

    string_ids = True  # kimi wants string ids

    def __init__(self, directory: Path, cap: int):
        super().__init__(directory, cap)
        self.turn: _Turn | None = None
        self.inflight: asyncio.Future[Any] | None = None
        self.prompts = 0

    async def start(self, spec: Spec) -> None:
        await self.spawn(*spec(self.dir))
        result = await self.call("initialize", {
            "protocol_version": PROTOCOL_VERSION, "client": {"name": "hegelion-queue", "version": __version__},
        })
        if not isinstance(result, dict) or not isinstance(result.get("protocol_version"), str):
            raise self._break(f"answered initialize with {result!r:.200}", "protocol")
        logger.info("kimi wire process %d started (kimi wire protocol %s)", self.pid, result["protocol_version"])

    def on_notification(self, method: str, params: Any) -> None:
        if method == "event" and self.turn is not None and isinstance(params, dict):
            payload = params.get("payload")
            if not self.turn.feed(params.get("type"), payload if isinstance(payload, dict) else {}):
                self._break(f"output over {self.cap} bytes", "overflow")
        # events outside a turn, and notifications a newer kimi may send, are not ours to act on

    def on_request(self, msg: dict[str, Any]) -> None:
        if msg.get("method") == "request":
            self._answer_request(msg)
        else:
            super().on_request(msg)

    def _answer_request(self, msg: dict[str, Any]) -> None:
        """kimi asks before a tool runs, for a question, for a hook; our agent has no tools, so: no."""
        params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
        kind, payload = params.get("type"), params.get("payload") or {}
        logger.warning("kimi wire process %s sent a %s request; declined", self.pid, kind)
        rid = payload.get("id", msg.get("id")) if isinstance(payload, dict) else msg.get("id")
        if kind == "ApprovalRequest":
            result: dict[str, Any] = {"request_id": rid, "response": "reject", "feedback": "tools are disabled"}
        elif kind == "QuestionRequest":
            result = {"request_id": rid, "answers": {}}
        elif kind == "HookRequest":
            result = {"request_id": rid, "action": "allow", "reason": ""}
        elif kind == "ToolCallRequest":
            result = {"tool_call_id": rid, "return_value": {"is_error": True, "output": "",
                                                             "message": "tools are disabled", "display": []}}
        else:
            self.respond(msg.get("id"), error={"code": -32601, "message": f"unsupported request {kind}"})
            return
        self.respond(msg.get("id"), result=result)

    # ------------------------------------------------------------ turns

    async def begin(self, user_input: str) -> asyncio.Future[Any]:
        """Send a prompt; its future resolves when the turn has ended (events collected in self.turn)."""
        self.turn = _Turn(self.cap)
        self.inflight = self.request("prompt", {"user_input": user_input})
        await self.drain()
        return self.inflight

    def end(self) -> _Turn:
        turn, self.turn, self.inflight = self.turn, None, None
        return turn or _Turn(self.cap)

    async def clear(self) -> None:
        """`/clear`, verified: kimi acknowledges it and reports an empty context; anything else -> Broken."""
        fut = await self.begin("/clear")
        try:
            result = await asyncio.shield(fut)
        except WireError as e:
            raise self._break(f"failed /clear ({e})", "protocol") from e
        turn = self.end()
        tokens = [s.get("context_tokens") for s in turn.statuses]
        if result != {"status": "finished"} or turn.answer.strip() != CLEARED or any(tokens):
            raise self._break(f"answered /clear with {result!r} {turn.answer[:200]!r} tokens {tokens}", "protocol")

    async def settle(self) -> None:
        """After a timeout or a cancelled job: cancel the turn in flight, wait for it to end, /clear."""
        if self.inflight is not None and not self.inflight.done():
            with contextlib.suppress(WireError):  # -32000: the turn ended meanwhile
                await asyncio.wait_for(self.call("cancel", {}), CANCEL_GRACE)
            with contextlib.suppress(WireError):
                await asyncio.wait_for(asyncio.shield(self.inflight), CANCEL_GRACE)
        self.end()
        await asyncio.wait_for(self.clear(), CANCEL_GRACE)


class WirePool:
    """Up to `size` long-lived kimi processes (one per job slot), started when first needed."""

    def __init__(self, spec: Spec, home: Path, *, size: int, recycle: int, timeout: float, cap: int):
        self.spec, self.home = spec, home
        self.size, self.recycle, self.timeout, self.cap = size, recycle, timeout, cap
        self._slots = asyncio.Semaphore(size)  # held from checkout until the process is idle again
        self._idle: list[WireProcess] = []
        self._all: set[WireProcess] = set()
        self._settling: set[asyncio.Task[None]] = set()
        self._stopping: set[asyncio.Task[None]] = set()
        self._serial = itertools.count(1)
        self.started = 0  # processes started so far (tests and logs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._all if p.pid is not None and p.alive]

    async def ask(self, text: str) -> Answer:
        """One prompt on one process. Raises TransientError / ConfigError like the print mode."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout  # covers waiting for a slot and starting a process too
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout)
        except asyncio.TimeoutError:
            raise TransientError(f"teacher timed out after {self.timeout:g}s waiting for a kimi process") from None
        proc: WireProcess | None = None
        give_back = True  # False once a background task owns the process (and the slot)
        try:
            proc = await self._checkout(max(deadline - loop.time(), 0.001))
            error: TeacherError | None = None
            result: Any = None
            proc.prompts += 1
            try:
                fut = await proc.begin(text)
                result = await asyncio.wait_for(asyncio.shield(fut), max(deadline - loop.time(), 0.001))
            except asyncio.TimeoutError:
                give_back = False
                self._settle_in_background(proc)
                raise TransientError(f"teacher timed out after {self.timeout:g}s") from None
            except asyncio.CancelledError:  # SIGTERM drain, arq abort: cancel the turn, keep the process
                give_back = False
                self._settle_in_background(proc)
                raise
            except WireError as e:
                error = classify(e)
                if e.code == -32000:  # "a turn is already in progress": we lost track of this process
                    proc._break(f"said {e.message!r}", "protocol")
            turn = proc.end()
            if error is None and not (isinstance(result, dict) and result.get("status") == "finished"):
                error = TransientError(f"teacher turn ended {result!r:.200}", proc.stderr_tail, turn.answer[:TAIL])
            if proc.alive:
                try:
                    await asyncio.wait_for(proc.clear(), CANCEL_GRACE)
                except asyncio.CancelledError:
                    give_back = False
                    self._settle_in_background(proc)
                    raise
                except (Broken, asyncio.TimeoutError) as e:  # the answer stands; the process is replaced
                    proc._break(f"did not clear its context ({e or 'timeout'})", "protocol")
                    logger.warning("kimi wire process %s replaced: %s", proc.pid, proc.broken)
            if error is not None:
                raise error
            if not turn.answer.strip():
                raise TransientError("teacher returned an empty answer", proc.stderr_tail, turn.answer)
            return Answer(turn.answer, "".join(turn.think), turn.usage)
        except Broken as e:  # the process died or spoke garbage mid-turn: it is replaced, the job retried
            assert proc is not None
            raise await proc.failure(e, proc.turn.answer[:TAIL] if proc.turn else "") from None
        finally:
            if give_back:
                self._checkin(proc)
                self._slots.release()

    async def _checkout(self, timeout: float) -> WireProcess:
        while self._idle:
            proc = self._idle.pop()
            if proc.alive:
                return proc
            self._retire(proc, "exited while idle")
        proc = WireProcess(self.home / f"kimi-{next(self._serial)}", self.cap)
        self._all.add(proc)
        try:
            await asyncio.wait_for(proc.start(self.spec), timeout)
        except BaseException as e:
            self._retire(proc, "failed to start")
            if not isinstance(e, (Broken, WireError, asyncio.TimeoutError)):
                raise  # FileNotFoundError, PermissionError (the Teacher words them), cancellation
            refused = "kimi refused initialize ({e}); is it kimi-cli 1.51?"
            raise await proc.start_error(e, self.timeout, "kimi", refused) from None
        self.started += 1
        return proc

    def _checkin(self, proc: WireProcess | None) -> None:
        if proc is None:
            return
        if not proc.alive:
            self._retire(proc, f"broken: {proc.broken}")
        elif proc.prompts >= self.recycle:
            self._retire(proc, f"recycled after {proc.prompts} prompts")
        else:
            self._idle.append(proc)

    def _retire(self, proc: WireProcess, why: str) -> None:
        """Kill now; reap and remove its directories in the background."""
        logger.info("kimi wire process %s retired: %s", proc.pid, why)
        proc._break(why, "exit")
        self._all.discard(proc)
        with contextlib.suppress(ValueError):
            self._idle.remove(proc)
        track(self._stopping, proc.stop())

    def _settle_in_background(self, proc: WireProcess) -> None:
        track(self._settling, self._settle(proc))

    async def _settle(self, proc: WireProcess) -> None:
        """Owns the process and its slot after a timeout or a cancelled job: back to the pool once the
        turn is cancelled and the context cleared, else killed (and replaced on the next checkout)."""
        try:
            await proc.settle()
        except BaseException as e:
            proc._break(f"did not end its turn within {CANCEL_GRACE:g}s of cancel ({e!r})", "stuck")
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self._checkin(proc)
            self._slots.release()

    async def close(self) -> None:
        """Kill every process (the worker's shutdown); asks still running fail as transient."""
        for task in list(self._settling):
            task.cancel()
        await asyncio.gather(*self._settling, return_exceptions=True)
        for proc in list(self._all):
            self._retire(proc, "pool closed")
        await asyncio.gather(*self._stopping, return_exceptions=True)
