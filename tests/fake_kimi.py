#!/usr/bin/env python3
"""A stand-in for kimi-cli 1.51.0 in print mode, for tests. Standard library only (fast start-up).

It takes kimi's real flags (`--print --output-format stream-json --agent-file F --work-dir D
[--config-file F] [--model M]`), reads the prompt on stdin, and answers like kimi: one JSON message per
line on stdout, errors as plain text on stdout, exit 0 / 1 (e.g. "LLM not set") / 2 (usage) / 75 (retryable).

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


def dialectic(prompt: str) -> str:
    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
    return (
        "<thought>\n"
        f"**THESIS**: The first position on the request holds that it deserves a direct answer ({digest[:16]}).\n"
        "**ANTITHESIS**: Against that, a direct answer can hide trade-offs, exceptions and costs.\n"
        "**SYNTHESIS**: A good answer states the main position and names the conditions where it fails.\n"
        "</thought>\n"
        f"Final answer: it depends on the conditions named above. [sha256:{digest}]"
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
        usage("wire mode is not faked yet")
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


if __name__ == "__main__":
    main()
