#!/usr/bin/env python3
"""A stand-in for Kimi Code CLI 2.1.0 (`kimi acp`, `kimi -p`, `kimi --version`) and for any ACP agent, for tests.
Standard library only (fast start-up).

`fake_acp.py --version` prints `2.1.0`. `fake_acp.py acp` speaks the Agent Client Protocol on stdin/stdout as
Kimi Code does (measured; see the closing notes): `initialize` (protocolVersion 1, sessionCapabilities close and
delete), `session/new {cwd, mcpServers}` -> `{sessionId: "session_<uuid>", configOptions, modes}`,
`session/prompt` -> `session/update` notifications (available_commands_update, session_info_update,
agent_thought_chunk, agent_message_chunk) then `{stopReason}`, then a `usage_update`; `session/cancel` ends a turn
with `cancelled`; `session/close` forgets a session, `session/delete` removes its folder. With KIMI_CODE_HOME set it
needs a model there (`config.toml` with `default_model`) or `session/new` fails with -32000 "Authentication
required", and it keeps each session as Kimi Code does, in `sessions/wd_<slug>/<sid>/agents/main/wire.jsonl`
(`usage.record`, `turn.ended` with the error of a failed turn). A provider error is, as in Kimi Code with one
attempt per step, an `end_turn` with no text (429, 500, 400) or a -32000 error (401, 403).
`fake_acp.py -p PROMPT --output-format stream-json` answers once, as `kimi -p` does (exit 1 and "error: failed to
run prompt: …" on stderr for a failure).

Failure modes, by FAKE_ACP_MODE or per prompt by a `[[fake:MODE]]` marker:
  ok, slow (FAKE_ACP_DELAY s, ends early on cancel), hang (ends only when cancelled), stuck (ignores cancel),
  empty, invalid (no dialectic), error429 / error500 / error400 / error401, crash (half a line, then SIGKILL of
  itself), garbage (a non-JSON line), huge (FAKE_ACP_HUGE_MB of text), tool (asks `session/request_permission` to
  run Bash `touch <FAKE_ACP_TOOL_FILE>` and runs it if allowed; also asks the client to write that file through
  `fs/write_text_file`; then answers).
FAKE_ACP_FAIL_RATE=p: error429 with probability p.  FAKE_ACP_DELAY=s: latency of every prompt.
FAKE_ACP_LOG=file: one JSON line per event (start, prompt, cancel, close, delete, permission, fs) with the pid.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_kimi import dialectic  # noqa: E402  (the same answers as the legacy fake)

VERSION = "2.1.0"
LOCK = threading.Lock()


def log(event: str, **fields) -> None:
    path = os.environ.get("FAKE_ACP_LOG")
    if path:
        with LOCK, open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": event, "pid": os.getpid(), "time": time.time(), **fields}) + "\n")


def mode_of(text: str) -> str:
    m = re.search(r"\[\[fake:(\w+)\]\]", text)
    if m:
        return m.group(1)
    rate = float(os.environ.get("FAKE_ACP_FAIL_RATE", "0") or 0)
    if rate and random.random() < rate:
        return "error429"
    return os.environ.get("FAKE_ACP_MODE", "ok")


def home() -> Path | None:
    h = os.environ.get("KIMI_CODE_HOME")
    return Path(h) if h else None


def configured() -> str | None:
    """The model Kimi Code would use, or None (no config: "Authentication required")."""
    h = home()
    if h is None:
        return "fake"
    try:
        import tomllib

        config = tomllib.loads((h / "config.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model = config.get("default_model")
    return model if model and model in config.get("models", {}) else None


def agent_md() -> str:
    h = home()
    try:
        return (h / "agents" / "agent.md").read_text(encoding="utf-8") if h else ""
    except OSError:
        return ""


STATUS = {"error429": (429, "provider.rate_limit"), "error500": (500, "provider.api_error"),
          "error400": (400, "provider.api_error"), "error401": (401, "provider.auth_error")}


class Session:
    def __init__(self, sid: str, cwd: str):
        self.sid, self.cwd = sid, cwd
        self.cancelled = threading.Event()
        self.dir = home() / "sessions" / "wd_fake" / sid if home() else None
        if self.dir:
            (self.dir / "agents" / "main").mkdir(parents=True)

    def record(self, entry: dict) -> None:
        if self.dir:
            with open(self.dir / "agents" / "main" / "wire.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")


class Agent:
    def __init__(self):
        self.sessions: dict[str, Session] = {}
        self.waiting: dict[int, dict] = {}  # our requests to the client -> the reply
        self.next_id = 0

    def send(self, msg: dict) -> None:
        with LOCK:
            sys.stdout.write(json.dumps(msg) + "\n")
            sys.stdout.flush()

    def reply(self, mid, result=None, error=None) -> None:
        self.send({"jsonrpc": "2.0", "id": mid, **({"error": error} if error else {"result": result})})

    def update(self, sid: str, update: dict) -> None:
        self.send({"jsonrpc": "2.0", "method": "session/update", "params": {"sessionId": sid, "update": update}})

    def ask_client(self, method: str, params: dict, timeout: float = 10) -> dict:
        with LOCK:
            self.next_id += 1
            rid = self.next_id
            box = self.waiting[rid] = {"event": threading.Event()}
        self.send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        box["event"].wait(timeout)
        return box

    def serve(self) -> None:
        log("start", argv=sys.argv[1:], home=os.environ.get("KIMI_CODE_HOME", ""), agent=agent_md(),
            cwd=os.getcwd())
        for line in sys.stdin:
            if not line.strip():
                continue
            msg = json.loads(line)
            method, mid, params = msg.get("method"), msg.get("id"), msg.get("params") or {}
            if method is None:  # a reply to one of our requests
                box = self.waiting.pop(msg.get("id"), None)
                if box is not None:
                    box.update(result=msg.get("result"), error=msg.get("error"))
                    box["event"].set()
                continue
            if method == "initialize":
                self.reply(mid, {
                    "protocolVersion": 1, "agentInfo": {"name": "Kimi Code CLI", "version": VERSION},
                    "agentCapabilities": {"loadSession": True, "promptCapabilities": {"image": True},
                                          "sessionCapabilities": {"close": {}, "delete": {}, "fork": {}}},
                    "authMethods": [{"id": "login", "type": "terminal", "name": "Login with Kimi account"}]})
                log("initialize", client=params.get("clientCapabilities"))
            elif method == "session/new":
                if configured() is None:
                    self.reply(mid, error={"code": -32000, "message": "Authentication required"})
                    continue
                sid = f"session_{uuid.uuid4()}"
                self.sessions[sid] = Session(sid, params.get("cwd", ""))
                self.reply(mid, {"sessionId": sid, "modes": {"currentModeId": "default", "availableModes": [
                    {"id": "default", "name": "Default"}, {"id": "yolo", "name": "YOLO"}]}})
            elif method == "session/prompt":
                session = self.sessions.get(params.get("sessionId"))
                if session is None:
                    self.reply(mid, error={"code": -32602, "message": f"Invalid params: Unknown sessionId: "
                                                                      f"{params.get('sessionId')}"})
                    continue
                text = "".join(p.get("text", "") for p in params.get("prompt") or [] if isinstance(p, dict))
                threading.Thread(target=self.turn, args=(mid, session, text), daemon=True).start()
            elif method == "session/cancel":
                session = self.sessions.get(params.get("sessionId"))
                log("cancel", session=params.get("sessionId"))
                if session:
                    session.cancelled.set()
            elif method in ("session/close", "session/delete"):
                sid = params.get("sessionId")
                session = self.sessions.pop(sid, None)
                if session:
                    session.cancelled.set()
                if method == "session/delete" and home():
                    shutil.rmtree(home() / "sessions" / "wd_fake" / str(sid), ignore_errors=True)
                log(method.split("/")[1], session=sid)
                self.reply(mid, {})
            elif mid is not None:
                self.reply(mid, error={"code": -32601, "message": f'"Method not found": {method}'})

    def turn(self, mid, session: Session, text: str) -> None:
        mode = mode_of(text)
        sid = session.sid
        log("prompt", session=sid, text=text, mode=mode, cwd=session.cwd)
        session.record({"type": "turn.prompt", "input": [{"type": "text", "text": text}]})
        self.update(sid, {"sessionUpdate": "available_commands_update", "availableCommands": []})
        self.update(sid, {"sessionUpdate": "session_info_update", "title": text[:40]})
        delay = float(os.environ.get("FAKE_ACP_DELAY", "0") or 0)
        if mode == "slow":
            delay = max(delay, 2.0)
        if delay and session.cancelled.wait(delay):
            return self.end(mid, session, "cancelled")
        if mode == "hang":
            session.cancelled.wait()
            return self.end(mid, session, "cancelled")
        if mode == "stuck":
            return  # never answers, cancel or not
        if mode == "crash":
            with LOCK:
                sys.stdout.write('{"jsonrpc": "2.0", "method": "session/upd')
                sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "garbage":
            with LOCK:
                sys.stdout.write("this is not JSON-RPC\n")
                sys.stdout.flush()
            return
        if mode in STATUS:
            status, code = STATUS[mode]
            message = f"{status} test status {status}"
            session.record({"type": "usage.record", "usage": {"inputOther": 50, "output": 0}})
            if status == 401:
                session.record({"type": "turn.ended", "reason": "failed", "error": {"code": code, "message": message}})
                return self.reply(mid, error={"code": -32000, "message": f"Authentication required: {message}"})
            session.record({"type": "turn.ended", "reason": "failed", "error": {
                "code": code, "message": message, "details": {"statusCode": status}, "retryable": status == 429}})
            return self.end(mid, session, "end_turn")
        if mode == "tool":
            self.tool(session)
        answer = {"empty": "", "invalid": "Just an answer, no dialectic."}.get(mode, dialectic(text, tagged=True))
        if mode == "huge":
            answer = "x" * int(float(os.environ.get("FAKE_ACP_HUGE_MB", "8")) * 1024 * 1024)
        if mode not in ("empty", "huge", "invalid"):
            self.update(sid, {"sessionUpdate": "agent_thought_chunk", "content": {"type": "text",
                                                                                  "text": "Weighing both sides."}})
        for i in range(0, len(answer), 64 * 1024 if mode == "huge" else 64):
            self.update(sid, {"sessionUpdate": "agent_message_chunk",
                              "content": {"type": "text", "text": answer[i:i + (64 * 1024 if mode == "huge" else 64)]}})
        session.record({"type": "usage.record", "usage": {"inputOther": 50, "output": 40, "inputCacheRead": 0}})
        session.record({"type": "turn.ended", "reason": "completed"})
        self.end(mid, session, "end_turn")

    def tool(self, session: Session) -> None:
        """What the default coding agent does with a model's tool call: ask, and run it if allowed."""
        target = os.environ.get("FAKE_ACP_TOOL_FILE", "/tmp/fake-acp-pwned")
        call = {"toolCallId": "0:call_1", "title": "Bash", "kind": "execute",
                "rawInput": {"command": f"touch {target}"}}
        self.update(session.sid, {"sessionUpdate": "agent_message_chunk",
                                  "content": {"type": "text", "text": "Let me run a command first."}})
        self.update(session.sid, {"sessionUpdate": "tool_call", "status": "pending", **call})
        box = self.ask_client("session/request_permission", {"sessionId": session.sid, "toolCall": call, "options": [
            {"optionId": "approve_once", "name": "Approve once", "kind": "allow_once"},
            {"optionId": "approve_always", "name": "Approve for this session", "kind": "allow_always"},
            {"optionId": "reject", "name": "Reject", "kind": "reject_once"}]})
        outcome = (box.get("result") or {}).get("outcome") or {}
        allowed = outcome.get("outcome") == "selected" and outcome.get("optionId", "").startswith("approve")
        log("permission", session=session.sid, outcome=outcome, ran=allowed)
        if allowed:
            subprocess.run(["touch", target], check=False)
        box = self.ask_client("fs/write_text_file", {"sessionId": session.sid, "path": target, "content": "pwned"})
        log("fs", session=session.sid, error=box.get("error"), result=box.get("result"))
        self.update(session.sid, {"sessionUpdate": "tool_call_update", "toolCallId": call["toolCallId"],
                                  "status": "completed" if allowed else "failed"})

    def end(self, mid, session: Session, reason: str) -> None:
        self.reply(mid, {"stopReason": reason})
        self.update(session.sid, {"sessionUpdate": "usage_update", "used": 90, "size": 100000})


def print_mode(prompt: str) -> int:
    """`kimi -p PROMPT --output-format stream-json`."""
    mode = mode_of(prompt)
    print(json.dumps({"role": "meta", "type": "system.version", "version": VERSION}), flush=True)
    if configured() is None:
        print("error: failed to run prompt: No model configured. Run `kimi` and use /login to sign in, then retry; "
              "or set default_model in config.toml.", file=sys.stderr)
        return 1
    log("prompt", text=prompt, mode=mode, argv=sys.argv[1:], agent=agent_md())
    if mode in STATUS:
        status, code = STATUS[mode]
        print(f"error: failed to run prompt: {code}: {status} test status {status}", file=sys.stderr)
        return 1
    answer = {"empty": "", "invalid": "Just an answer, no dialectic."}.get(mode, dialectic(prompt, tagged=True))
    print(json.dumps({"role": "assistant", "content": answer}))
    print(json.dumps({"role": "meta", "type": "session.resume_hint", "content": "To resume this session: kimi -r x"}))
    return 0


def main() -> int:
    args = sys.argv[1:]
    if args[:1] in (["--version"], ["-V"]):
        print(VERSION)
        return 0
    if args[:1] == ["acp"]:
        Agent().serve()
        return 0
    if "-p" in args or "--prompt" in args:
        i = args.index("-p") if "-p" in args else args.index("--prompt")
        if i + 1 >= len(args):
            print("error: option '-p, --prompt <prompt>' argument missing", file=sys.stderr)
            return 1
        return print_mode(args[i + 1])
    print(f"error: unknown command or option {args[:1]}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
