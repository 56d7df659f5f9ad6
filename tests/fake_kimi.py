#!/usr/bin/env python3
"""A stand-in for kimi-cli 1.51.0 in print and wire mode, for tests. Standard library only (fast start-up).

It takes kimi's real flags (`--print --output-format stream-json --agent-file F --work-dir D
[--config-file F] [--model M]`), reads the prompt on stdin, and answers like kimi: one JSON message per
line on stdout, errors as plain text on stdout, exit 0 / 1 (e.g. "LLM not set") / 2 (usage) / 75 (retryable).

With `--wire` it stays up and speaks kimi's JSON-RPC on stdin/stdout (string ids; `initialize`,
`prompt` with `user_input` answered after `event` notifications TurnBegin / StepBegin / ContentPart /
StatusUpdate / TurnEnd, `cancel`; `/clear` acknowledged with "The context has been cleared."). Like
kimi it keeps every prompt in its context until `/clear`, failed ones too; each log line carries
`context`, the user messages the context held with that prompt (1 after a /clear), and `clears`.
In wire mode exit75 is a -32003 error reply ("Error code: 429 ..."), exit1 is -32001 (LLM not set),
and there are error503 / error400 replies, `hang` (a turn that ends only when cancelled) and `stuck`
(a turn that ignores cancel); garbage writes a non-JSON line and then hangs; crash kills itself mid-line.
FAKE_KIMI_LOG_CLEARS=1 logs every /clear too ({"clear": true, "pid": ...}); FAKE_KIMI_BAD_CLEAR=1 answers
/clear like an unknown command and keeps the context. With KIMI_BASE_URL set, wire mode asks that
OpenAI-compatible server (non-streaming) with the agent's system prompt and its whole context, as kimi
would, and answers with its reply (an HTTP error becomes a -32003 reply "Error code: NNN - ...").

Failure modes, chosen by FAKE_KIMI_MODE or per prompt by a `[[fake:MODE]]` marker in the prompt:
  ok, slow (FAKE_KIMI_DELAY s), hang, garbage, empty, invalid (no dialectic), exit75, exit1, exit2,
  crash (half a line, then SIGKILL of itself), huge (FAKE_KIMI_HUGE_MB of output), slash (a leading /word
  is eaten as a slash command, as kimi does).
FAKE_KIMI_FAIL_TIMES=N: the first N calls for each prompt exit 75 (state in FAKE_KIMI_STATE dir).
FAKE_KIMI_FAIL_RATE=p: exit 75 with probability p.  FAKE_KIMI_DELAY=s: latency of every call.
FAKE_KIMI_LOG=file: append one JSON line per call (argv, stdin, pid, agent file text, KIMI_SHARE_DIR).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import sys
import threading
import time


def usage(msg: str) -> None:
    sys.stderr.write(f"Usage: kimi [OPTIONS]\nError: {msg}\n")
    sys.exit(2)


def parse_args(argv: list[str]) -> dict:
    opts = {"print": False, "output_format": "text", "agent_file": None, "work_dir": os.getcwd(),
            "config_file": None, "model": None, "prompt": None, "wire": False}
    it = iter(argv)
    for a in it:
        if a == "--print":
            opts["print"] = True
        elif a == "--wire":
            opts["wire"] = True
        elif a == "--quiet":
            opts["print"], opts["output_format"] = True, "quiet"
        elif a in ("--output-format", "--agent-file", "--work-dir", "-w", "--config-file", "--model", "-m",
                   "-p", "--prompt", "-c", "--command"):
            try:
                v = next(it)
            except StopIteration:
                usage(f"Option '{a}' requires an argument.")
            key = {"-w": "work_dir", "-m": "model", "-p": "prompt", "--prompt": "prompt", "-c": "prompt",
                   "--command": "prompt"}.get(a, a[2:].replace("-", "_"))
            opts[key] = v
        elif a in ("--yolo", "--thinking", "--no-thinking", "--debug", "--verbose"):
            pass
        elif a == "--version":
            print("kimi, version 1.51.0 (fake)")
            sys.exit(0)
        else:
            usage(f"No such option: {a}")
    if opts["print"] and opts["wire"]:
        usage("Cannot combine --print and --wire.")
    if opts["output_format"] not in ("text", "stream-json", "quiet"):
        usage(f"Invalid value for '--output-format': {opts['output_format']!r}")
    if not os.path.isdir(opts["work_dir"]):
        usage(f"Invalid value for '--work-dir' / '-w': Directory '{opts['work_dir']}' does not exist.")
    for key in ("agent_file", "config_file"):
        if opts[key] and not os.path.isfile(opts[key]):
            usage(f"Invalid value for '--{key.replace('_', '-')}': File '{opts[key]}' does not exist.")
    return opts


def dialectic(prompt: str, tagged: bool = False) -> str:
    """The answer to `prompt`: a fixed dialectic that names the request (its last line's first six words), so a
    tiny model can learn it in a few hundred steps (make demo, the trainer tests). `tagged` ends the final answer
    with the prompt's sha256, so a test can tell which prompt an answer belongs to."""
    subject = " ".join(prompt.strip().splitlines()[-1].split()[:6]).replace('"', "'")
    tag = f" [sha256:{hashlib.sha256(prompt.encode('utf-8')).hexdigest()}]" if tagged else ""
    return (
        "<thought>\n"
        f'**THESIS**: The first position on "{subject}" holds that it deserves a direct answer.\n'
        "**ANTITHESIS**: Against that, a direct answer can hide trade-offs, exceptions and costs.\n"
        "**SYNTHESIS**: A good answer states the main position and names the conditions where it fails.\n"
        "</thought>\n"
        f"Final answer: it depends on the conditions named above.{tag}"
    )


def emit(message: dict) -> None:
    sys.stdout.write(json.dumps(message, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def counter(prompt: str) -> int:
    state = os.environ.get("FAKE_KIMI_STATE")
    if not state:
        return 1
    os.makedirs(state, exist_ok=True)
    path = os.path.join(state, hashlib.sha256(prompt.encode()).hexdigest())
    with open(path, "a") as f:
        f.write("x")
    return os.path.getsize(path)


def main() -> None:
    opts = parse_args(sys.argv[1:])
    if opts["wire"]:
        if os.environ.get("FAKE_KIMI_MODE") == "exit2":
            usage("Invalid value for '--output-format'")
        Wire(opts).serve()
        return
    raw = opts["prompt"] if opts["prompt"] is not None else sys.stdin.buffer.read().decode("utf-8")
    prompt = raw.strip()
    if log := os.environ.get("FAKE_KIMI_LOG"):
        agent = open(opts["agent_file"], encoding="utf-8").read() if opts["agent_file"] else None
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"argv": sys.argv[1:], "stdin": raw, "pid": os.getpid(), "agent": agent, "t": time.time(),
                                "share_dir": os.environ.get("KIMI_SHARE_DIR")}) + "\n")
    if not prompt:  # like kimi: "Empty command, skipping", exit 0, nothing on stdout
        sys.exit(0)
    m = re.search(r"\[\[fake:(\w+)\]\]", prompt)
    mode = m.group(1) if m else os.environ.get("FAKE_KIMI_MODE", "ok")
    if prompt.startswith("/"):
        mode = "slash"
    delay = float(os.environ.get("FAKE_KIMI_DELAY", "0"))
    if delay:
        time.sleep(delay)
    fail_times = int(os.environ.get("FAKE_KIMI_FAIL_TIMES", "0"))
    if fail_times and counter(prompt) <= fail_times:
        mode = "exit75"
    if random.random() < float(os.environ.get("FAKE_KIMI_FAIL_RATE", "0")):
        mode = "exit75"

    if mode == "ok":
        emit({"role": "assistant", "content": [{"type": "think", "think": "Weighing both sides.", "encrypted": None},
                                               {"type": "text", "text": dialectic(prompt)}]})
    elif mode == "slow":
        time.sleep(float(os.environ.get("FAKE_KIMI_SLOW", "2")))
        emit({"role": "assistant", "content": dialectic(prompt)})
    elif mode == "hang":
        time.sleep(3600)
    elif mode == "garbage":
        sys.stdout.write("\x00\x01 not json {{{ at all\n")
    elif mode == "empty":
        emit({"role": "assistant", "content": ""})
    elif mode == "invalid":
        emit({"role": "assistant", "content": "Sure! Here is a short answer without any structure."})
    elif mode == "exit75":
        print("Error code: 429 - {'error': {'message': 'rate limit exceeded'}}")
        sys.exit(75)
    elif mode == "exit1":
        print("LLM not set")
        sys.exit(1)
    elif mode == "exit2":
        usage("Invalid value for '--output-format'")
    elif mode == "crash":
        sys.stdout.write('{"role": "assistant", "content": "<thought>\\n**THESIS**: half')
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "huge":
        chunk = "x" * 1024 * 1024
        for _ in range(int(os.environ.get("FAKE_KIMI_HUGE_MB", "16"))):
            sys.stdout.write(chunk)
        sys.stdout.write("\n")
    elif mode == "slash":
        print(f"Unknown slash command: {prompt.split()[0]}")
    else:
        usage(f"unknown FAKE_KIMI_MODE {mode!r}")


def log_call(opts: dict, record: dict) -> None:
    if log := os.environ.get("FAKE_KIMI_LOG"):
        agent = open(opts["agent_file"], encoding="utf-8").read() if opts["agent_file"] else None
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"argv": sys.argv[1:], "pid": os.getpid(), "agent": agent, "t": time.time(),
                                "share_dir": os.environ.get("KIMI_SHARE_DIR"), **record}) + "\n")


class Wire:
    """`kimi --wire`: requests on stdin; each turn runs in a thread so `cancel` can reach it."""

    def __init__(self, opts: dict):
        self.opts = opts
        self.lock = threading.Lock()
        self.busy = False  # a turn is running (cleared before its reply is sent, as kimi does)
        self.cancel = threading.Event()
        self.history: list[dict] = []  # the context: user and assistant messages since the last /clear
        self.clears = 0

    @property
    def context(self) -> int:
        return sum(m["role"] == "user" for m in self.history)

    def system_prompt(self) -> str:
        agent = self.opts["agent_file"]
        if not agent:
            return ""
        m = re.search(r"system_prompt_path:\s*(\S+)", open(agent, encoding="utf-8").read())
        return open(os.path.join(os.path.dirname(agent), m.group(1)), encoding="utf-8").read() if m else ""

    def ask_server(self, base_url: str) -> tuple[int, str]:
        """POST the context to an OpenAI-compatible server: (HTTP status, reply text or error body)."""
        import urllib.error
        import urllib.request

        body = {"model": os.environ.get("KIMI_MODEL_NAME", "fake"), "stream": False,
                "messages": [{"role": "system", "content": self.system_prompt()}, *self.history]}
        req = urllib.request.Request(base_url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {os.environ.get('KIMI_API_KEY', '')}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return 200, json.loads(r.read())["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")

    def send(self, msg: dict) -> None:
        with self.lock:
            sys.stdout.write(json.dumps({"jsonrpc": "2.0", **msg}, ensure_ascii=False) + "\n")
            sys.stdout.flush()

    def event(self, kind: str, payload: dict) -> None:
        self.send({"method": "event", "params": {"type": kind, "payload": payload}})

    def error(self, mid, code: int, message: str) -> None:
        self.send({"id": mid, "error": {"code": code, "message": message, "data": None}})

    def serve(self) -> None:
        for raw in iter(sys.stdin.buffer.readline, b""):
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                self.error(None, -32700, "Invalid JSON format")
                continue
            if (not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0"
                    or not isinstance(msg.get("id"), (str, type(None)))):  # kimi wants string ids
                self.error(None, -32600, "Invalid request")
                continue
            method, mid, params = msg.get("method"), msg.get("id"), msg.get("params") or {}
            if method is None:
                continue  # a response to a request of ours (we send none)
            busy = self.busy
            if method == "initialize":
                if not isinstance(params.get("protocol_version"), str):
                    self.error(mid, -32602, "Invalid parameters for method `initialize`")
                else:
                    self.send({"id": mid, "result": {
                        "protocol_version": "1.10", "server": {"name": "Kimi Code CLI", "version": "1.51.0 (fake)"},
                        "slash_commands": [], "capabilities": {"supports_question": True}}})
            elif method == "prompt":
                text = params.get("user_input")
                if not isinstance(text, str):
                    self.error(mid, -32602, "Invalid parameters for method `prompt`")
                elif busy:
                    self.error(mid, -32000, "An agent turn is already in progress")
                else:
                    self.cancel.clear()
                    self.busy = True
                    threading.Thread(target=self.run_turn, args=(mid, text), daemon=True).start()
            elif method == "cancel":
                if busy:
                    self.cancel.set()
                    self.send({"id": mid, "result": {}})
                else:
                    self.error(mid, -32000, "No agent turn is in progress")
            elif mid is not None:
                self.error(mid, -32601, f"Unexpected method received: {method}")
        os._exit(0)  # stdin closed: kimi shuts down, pending turns are dropped

    def finish(self, mid, status: str = "finished") -> None:
        self.event("TurnEnd", {})
        self.busy = False
        self.send({"id": mid, "result": {"status": status}})

    def fail(self, mid, code: int, message: str) -> None:
        self.busy = False
        self.error(mid, code, message)

    def run_turn(self, mid, text: str) -> None:
        self.event("TurnBegin", {"user_input": text})
        prompt = text.strip()
        if prompt.startswith("/"):  # a slash command: never reaches the model
            name = prompt.split()[0]
            if name in ("/clear", "/reset") and not os.environ.get("FAKE_KIMI_BAD_CLEAR"):
                self.history, self.clears = [], self.clears + 1
                if os.environ.get("FAKE_KIMI_LOG_CLEARS"):
                    log_call(self.opts, {"clear": True, "clears": self.clears})
                self.event("ContentPart", {"type": "text", "text": "The context has been cleared."})
                self.event("StatusUpdate", {"context_usage": 0.0, "context_tokens": 0, "max_context_tokens": 100000,
                                            "token_usage": None})
            else:
                self.event("ContentPart", {"type": "text", "text": f'Unknown slash command "{name}".'})
            self.finish(mid)
            return
        self.history.append({"role": "user", "content": text})
        log_call(self.opts, {"stdin": text, "wire": True, "context": self.context, "clears": self.clears})
        m = re.search(r"\[\[fake:(\w+)\]\]", prompt)
        mode = m.group(1) if m else os.environ.get("FAKE_KIMI_MODE", "ok")
        fail_times = int(os.environ.get("FAKE_KIMI_FAIL_TIMES", "0"))
        if fail_times and counter(prompt) <= fail_times:
            mode = "exit75"
        if random.random() < float(os.environ.get("FAKE_KIMI_FAIL_RATE", "0")):
            mode = "exit75"
        self.event("StepBegin", {"n": 1})
        delay = float(os.environ.get("FAKE_KIMI_DELAY", "0"))
        if mode == "slow":
            delay += float(os.environ.get("FAKE_KIMI_SLOW", "2"))
        if mode == "hang":
            delay = 3600
        if mode == "stuck":
            time.sleep(3600)
        if delay and self.cancel.wait(delay):
            self.event("StepInterrupted", {})
            self.finish(mid, "cancelled")
            return
        usage = {"input_other": 120, "output": 80, "input_cache_read": 0, "input_cache_creation": 0}
        if mode in ("ok", "slow") and os.environ.get("KIMI_BASE_URL"):
            status, answer = self.ask_server(os.environ["KIMI_BASE_URL"])
            if status != 200:
                self.event("StepInterrupted", {})
                self.event("TurnEnd", {})
                self.fail(mid, -32003, f"Error code: {status} - {answer}")
                return
            self.history.append({"role": "assistant", "content": answer})
            self.event("ContentPart", {"type": "text", "text": answer})
        elif mode in ("ok", "slow"):
            answer = dialectic(prompt)
            self.history.append({"role": "assistant", "content": answer})
            self.event("ContentPart", {"type": "think", "think": "Weighing both sides.", "encrypted": None})
            for i in range(0, len(answer), 97):  # streamed in chunks, as kimi does
                self.event("ContentPart", {"type": "text", "text": answer[i:i + 97]})
        elif mode == "empty":
            pass
        elif mode == "invalid":
            self.event("ContentPart", {"type": "text", "text": "Sure! Here is a short answer without any structure."})
        elif mode in ("exit75", "error429", "error503", "error400"):
            status, what = {"error503": (503, "overloaded"), "error400": (400, "bad request")}.get(
                mode, (429, "rate limit exceeded"))
            self.event("StepInterrupted", {})
            self.event("TurnEnd", {})
            self.fail(mid, -32003, f"Error code: {status} - {{'error': {{'message': '{what}'}}}}")
            return
        elif mode == "exit1":
            self.fail(mid, -32001, "LLM is not set")
            return
        elif mode == "exit2":
            sys.stderr.write("Error: Invalid value for '--output-format'\n")
            sys.stderr.flush()
            os._exit(2)
        elif mode == "garbage":
            with self.lock:
                sys.stdout.write("\x00\x01 not json {{{ at all\n")
                sys.stdout.flush()
            time.sleep(3600)
        elif mode == "crash":
            with self.lock:
                sys.stdout.write('{"jsonrpc": "2.0", "method": "event", "params": {"type": "ContentPart", "payl')
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        elif mode == "huge":
            chunk = "x" * 1024 * 1024
            for _ in range(int(os.environ.get("FAKE_KIMI_HUGE_MB", "16"))):
                self.event("ContentPart", {"type": "text", "text": chunk})
        else:
            self.fail(mid, -32603, f"unknown FAKE_KIMI_MODE {mode!r}")
            return
        self.event("StatusUpdate", {"context_usage": 0.01, "context_tokens": 200 * self.context,
                                    "max_context_tokens": 100000, "token_usage": usage})
        self.finish(mid)


if __name__ == "__main__":
    main()
