"""One long-lived teacher process spoken to in JSON-RPC 2.0 over stdio, a message a line.

What every such protocol shares (kimi-cli's wire, the Agent Client Protocol): the process is started by
`process.spawn` (no shell, own process group, PR_SET_PDEATHSIG); our requests wait on futures keyed by id;
the agent's notifications and requests go to the subclass (`on_notification`, `on_request`); a process that
exits, writes anything but JSON-RPC, answers a call we did not make or writes a line over the cap is *broken*:
its group is killed and every call waiting on it fails with `Broken`, so the prompts in flight are retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
from pathlib import Path
from typing import Any

import orjson

from .process import TAIL, ConfigError, TeacherError, TransientError, kill_group, spawn

LINE_SLACK = 1 << 20  # one stdout line may be this much longer than the output cap


class RpcError(Exception):
    """A JSON-RPC error response: the call failed, the process is fine."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.data = code, message, data


class Broken(Exception):
    """The process exited, wrote something that is not our protocol, or stopped answering in time."""

    def __init__(self, reason: str, kind: str):
        super().__init__(reason)
        self.kind = kind  # exit | garbage | overflow | protocol | stuck


def track(tasks: set[asyncio.Task[None]], coro: Any) -> None:
    """Run coro in the background, holding its task in `tasks` until it ends (a pool awaits them on close)."""
    task = asyncio.create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _consume(fut: asyncio.Future[Any]) -> None:  # a failed call nobody awaits any more is not an error
    if not fut.cancelled():
        fut.exception()


class RpcProcess:
    """A process, our calls to it and its messages to us. Subclasses say what a notification or a request
    from the agent means; `string_ids` for peers that want string request ids (kimi-cli's wire)."""

    string_ids = False

    def __init__(self, directory: Path, cap: int):
        self.dir, self.cap = directory, cap
        self.proc: asyncio.subprocess.Process | None = None
        self.pending: dict[Any, asyncio.Future[Any]] = {}
        self.broken: Broken | None = None
        self._ids = itertools.count(1)
        self._err = ""
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def stderr_tail(self) -> str:
        return self._err[-TAIL:]

    @property
    def alive(self) -> bool:
        return self.broken is None and self.proc is not None and self.proc.returncode is None

    async def spawn(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = await spawn(argv, env=env, cwd=cwd, limit=self.cap + LINE_SLACK)
        self._tasks = [asyncio.create_task(self._read_stdout()), asyncio.create_task(self._read_stderr())]

    # ------------------------------------------------------------ what subclasses decide

    def on_notification(self, method: str, params: Any) -> None:
        """A notification from the agent (default: ignored)."""

    def on_request(self, msg: dict[str, Any]) -> None:
        """A request from the agent (default: method not found)."""
        self.respond(msg.get("id"), error={"code": -32601, "message": f"method not found: {msg.get('method')}"})

    # ------------------------------------------------------------ the wire

    def _break(self, reason: str, kind: str) -> Broken:
        """Mark the process unusable, kill its group, fail every call waiting on it."""
        if self.broken is None:
            self.broken = Broken(reason, kind)
            if self.proc is not None:
                kill_group(self.proc)
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(self.broken)
            self.pending.clear()
            self.on_broken(self.broken)
        return self.broken

    def on_broken(self, broken: Broken) -> None:
        """Called once when the process breaks (subclasses fail what else waits on it)."""

    def _send(self, msg: dict[str, Any]) -> None:
        if self.broken:
            raise self.broken
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(orjson.dumps(msg) + b"\n")
        except (BrokenPipeError, ConnectionResetError, RuntimeError) as e:
            raise self._break(f"closed its stdin ({e})", "exit") from e

    async def drain(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise self._break(f"closed its stdin ({e})", "exit") from e

    def request(self, method: str, params: dict[str, Any]) -> asyncio.Future[Any]:
        n = next(self._ids)
        rid: Any = f"{method}-{n}" if self.string_ids else n
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_consume)
        self.pending[rid] = fut
        self._send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        return fut

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        fut = self.request(method, params)
        await self.drain()
        return await asyncio.shield(fut)

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self._send({"jsonrpc": "2.0", "method": method, "params": params})

    def respond(self, rid: Any, result: Any = None, error: dict[str, Any] | None = None) -> None:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid}
        if error is not None:
            msg["error"] = error
        else:
            msg["result"] = result
        with contextlib.suppress(Broken):
            self._send(msg)

    async def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            while self.broken is None:
                try:
                    line = await self.proc.stdout.readline()
                except ValueError:  # asyncio's LimitOverrunError: one line longer than the limit
                    self._break(f"output over {self.cap} bytes", "overflow")
                    return
                if not line.endswith(b"\n"):  # end of file, maybe after half a line: the process is gone
                    try:
                        rc = await asyncio.wait_for(self.proc.wait(), 3)
                    except asyncio.TimeoutError:
                        kill_group(self.proc)
                        rc = await self.proc.wait()
                    self._break(f"exited {rc}", "exit")
                    return
                if line.strip():
                    self._on_line(line)
        except asyncio.CancelledError:  # a teacher never outlives the event loop that reads it
            self._break("lost its reader", "exit")
            with contextlib.suppress(BaseException):  # reap it while the loop still runs
                await asyncio.wait_for(self.proc.wait(), 2)
            raise

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with contextlib.suppress(Exception):
            while chunk := await self.proc.stderr.read(4096):
                self._err = (self._err + chunk.decode("utf-8", "replace"))[-TAIL:]

    def _on_line(self, line: bytes) -> None:
        try:
            msg = orjson.loads(line)
        except orjson.JSONDecodeError:
            msg = None
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            self._break(f"wrote garbage: {line[:200]!r}", "garbage")
            return
        method = msg.get("method")
        if isinstance(method, str):
            if "id" in msg:
                self.on_request(msg)
            else:
                self.on_notification(method, msg.get("params"))
            return
        rid = msg.get("id")
        fut = self.pending.pop(rid, None) if isinstance(rid, (str, int)) else None
        if fut is None:
            self._break(f"answered a call we did not make: {line[:200]!r}", "protocol")
            return
        if fut.done():
            return
        err = msg.get("error")
        if isinstance(err, dict):
            fut.set_exception(RpcError(int(err.get("code") or 0), str(err.get("message") or ""), err.get("data")))
        else:
            fut.set_result(msg.get("result"))

    async def stderr_read(self, timeout: float = 1.0) -> None:
        """Wait a moment for the rest of a dead process's stderr (for the error message)."""
        if len(self._tasks) == 2:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._tasks[1]), timeout)

    async def failure(self, e: Broken, partial: str) -> TransientError:
        """The process broke mid-turn: the job is retried, with its stderr and what it had answered so far."""
        await self.stderr_read()
        what = f"output over {self.cap} bytes" if e.kind == "overflow" else str(e)
        return TransientError(f"teacher {what}", self.stderr_tail, partial)

    async def start_error(self, e: Broken | RpcError | asyncio.TimeoutError, timeout: float, name: str,
                          refused: str) -> TeacherError:
        """A process that cannot get through its handshake fails the same way next time: a set-up error, unless a
        signal or the clock stopped it. `name` is what the user calls the agent; `refused` words a refusal ({e})."""
        await self.stderr_read()
        tail = self.stderr_tail
        if isinstance(e, asyncio.TimeoutError):
            return TransientError(f"teacher timed out after {timeout:g}s starting {name}", tail)
        if isinstance(e, RpcError):
            return ConfigError(refused.format(e=e), tail)
        rc = self.proc.returncode if self.proc else None
        if e.kind == "exit" and (rc is None or rc < 0):
            return TransientError(f"teacher {e} while starting", tail)
        why = (tail.strip() or str(e))[-300:]
        return ConfigError(f"{name} {e} while starting: {why}", tail)

    async def stop(self) -> None:
        """Kill the process group, reap it, remove its directory."""
        if self.proc is not None:
            self._break("stopped", "exit")
            kill_group(self.proc)
            with contextlib.suppress(asyncio.TimeoutError, ProcessLookupError):
                await asyncio.wait_for(self.proc.wait(), 5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        shutil.rmtree(self.dir, ignore_errors=True)
