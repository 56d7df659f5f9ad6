"""How a kimi teacher process is set up: which kimi it is, and what it sees of the user's own set-up.

Two CLIs answer to `kimi`: **Kimi Code** (npm `@moonshot-ai/kimi-code`, 2.x; `kimi acp` speaks the Agent Client
Protocol) and the legacy **kimi-cli** (PyPI, 1.x; `kimi --wire`). `kimi --version` tells them apart.

Every teacher process gets a private home (Kimi Code: `KIMI_CODE_HOME`; kimi-cli: `KIMI_SHARE_DIR`), so its
sessions, logs and history stay out of the user's folder and die with the process. What it needs of the user's
folder is linked in, never copied:
- an OpenAI-compatible endpoint in `KIMI_BASE_URL` / `KIMI_API_KEY` / `KIMI_MODEL_NAME` wins: Kimi Code gets a
  private `config.toml` written from them (kimi-cli reads the variables itself);
- otherwise the user's login: Kimi Code's `config.toml` and its `credentials/` and `oauth/` folders (from
  `$KIMI_CODE_HOME` or `~/.kimi-code`), kimi-cli's `config.toml` (as `--config-file`) and `credentials/` (from
  `$KIMI_SHARE_DIR` or `~/.kimi`). The folders are symlinks, not copies: an OAuth refresh rotates the refresh
  token, and a copy would hold a dead one — its process, and then every other, would be logged out. Through the
  links every process, the user's own `kimi` included, refreshes under kimi's own lock in the shared folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import orjson

from ..dialectic import TEACHER_PROMPT
from .process import kill_group, pdeathsig_args

VERSION_TIMEOUT = 60.0  # seconds `kimi --version` may take (a cold kimi-cli starts in a few, Kimi Code in ~1.5)
NODE_HEAP_MB = 512  # V8 collects lazily: without a cap one `kimi acp` grew 1.4 MB a session (measured 427 -> 836 MB)
KIMI_CODE_CONTEXT = 131072  # max_context_size Kimi Code needs for an endpoint model (KIMI_MODEL_MAX_CONTEXT_SIZE wins)
ENDPOINT_VARS = ("KIMI_BASE_URL", "KIMI_API_KEY", "KIMI_MODEL_NAME")
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")


def kimi_version(binary: str) -> str:
    """`kimi --version`'s first line, or why there is none ("unavailable (…)")."""
    try:
        mtime = os.stat(_which(binary)).st_mtime
    except OSError:
        mtime = 0.0
    return _version(binary, mtime)


@lru_cache(maxsize=8)
def _version(binary: str, mtime: float) -> str:
    """Bounded and never orphaned: its own process group (killed whole on timeout or on any interruption of ours)
    and PR_SET_PDEATHSIG, as every teacher process."""
    if not shutil.which(binary):  # setpriv would exec it and exit 127: say what it is
        return f"unavailable (FileNotFoundError running {binary})"
    argv, preexec = pdeathsig_args([binary, "--version"])
    env = {**os.environ, "KIMI_CLI_NO_AUTO_UPDATE": "1", "KIMI_CODE_NO_AUTO_UPDATE": "1"}
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, start_new_session=True, preexec_fn=preexec)
    except (FileNotFoundError, PermissionError) as e:
        return f"unavailable ({type(e).__name__} running {binary})"
    try:
        out, _ = p.communicate(timeout=VERSION_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"unavailable ({binary} --version did not answer in {VERSION_TIMEOUT:g}s)"
    finally:  # a timeout, SIGTERM (KeyboardInterrupt), anything: the probe goes with us
        if p.poll() is None:
            kill_group(p)
            p.wait()
    lines = out.strip().splitlines()
    if p.returncode != 0 or not lines:
        return f"unavailable ({binary} --version exited {p.returncode})"
    return lines[0].strip()


def _which(binary: str) -> str:
    return shutil.which(binary) or binary


def major(version: str) -> int | None:
    """2 for Kimi Code 2.x (`2.1.0`), 1 for kimi-cli (`kimi, version 1.51.0`), None when unknown."""
    if version.startswith("unavailable"):
        return None
    m = _VERSION.search(version)
    return int(m.group(1)) if m else None


def is_kimi_code(binary: str) -> bool:
    """Whether `binary` is Kimi Code (2.x) rather than kimi-cli, by its (cached) `--version`."""
    return (major(kimi_version(binary)) or 0) >= 2


def endpoint(env: dict[str, str]) -> tuple[str, str, str] | None:
    """(base URL, API key, model) when KIMI_BASE_URL names an OpenAI-compatible endpoint."""
    base = env.get("KIMI_BASE_URL", "").strip()
    return (base, env.get("KIMI_API_KEY", ""), env.get("KIMI_MODEL_NAME", "")) if base else None


def user_kimi_code_home(env: dict[str, str]) -> Path:
    return Path(env.get("KIMI_CODE_HOME") or Path.home() / ".kimi-code").expanduser()


def user_share_dir(env: dict[str, str]) -> Path:
    return Path(env.get("KIMI_SHARE_DIR") or Path.home() / ".kimi").expanduser()


def _link(target: Path, link: Path) -> None:
    if target.exists() and not link.exists():
        link.symlink_to(target)


def _toml_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ------------------------------------------------------------------ Kimi Code (ACP)

AGENT_MD = """---
name: agent
description: hegelion-queue teacher (no tools)
override: true
tools: []
---
{prompt}
"""


def kimi_code_home(home: Path, env: dict[str, str]) -> Path:
    """A private KIMI_CODE_HOME: the teacher agent (it replaces Kimi Code's coding agent: our instructions are the
    whole system prompt, no tools), and the model: the endpoint's config, or links to the user's login."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    agents = home / "agents"
    agents.mkdir(exist_ok=True)
    # the body is a template (`${cwd}` is filled in): TEACHER_PROMPT has no `${` (tests/test_acp.py checks)
    (agents / "agent.md").write_text(AGENT_MD.format(prompt=TEACHER_PROMPT), encoding="utf-8")
    if ep := endpoint(env):
        base, key, model = ep
        context = env.get("KIMI_MODEL_MAX_CONTEXT_SIZE", "") or str(KIMI_CODE_CONTEXT)
        config = home / "config.toml"
        config.write_text(
            'default_model = "teacher"\ntelemetry = false\n\n[providers.endpoint]\ntype = "openai"\n'
            f"base_url = {_toml_string(base)}\napi_key = {_toml_string(key)}\n\n"
            f'[models.teacher]\nprovider = "endpoint"\nmodel = {_toml_string(model or "default")}\n'
            f"max_context_size = {int(context)}\n", encoding="utf-8")
        config.chmod(0o600)
        return home
    user = user_kimi_code_home(env)
    if (user / "credentials").is_dir():
        # kimi's refresh lock lives in oauth/: every process must take the same one (see the module docstring)
        (user / "oauth").mkdir(mode=0o700, exist_ok=True)
    for name in ("config.toml", "credentials", "oauth", "device_id"):
        _link(user / name, home / name)
    return home


def kimi_code_env(home: Path, env: dict[str, str]) -> dict[str, str]:
    """The environment of one `kimi acp`: its private home, no self-update, no telemetry, one provider attempt per
    call (the job's own retry policy retries; kimi's own would spend ~140 s on a 429 before answering), a V8 heap
    cap, and the KIMI_MODEL_* variables cleared (they would override the private config)."""
    out = {k: v for k, v in env.items() if not k.startswith("KIMI_MODEL_")}
    node_options = env.get("NODE_OPTIONS", "")
    if "max-old-space-size" not in node_options:
        node_options = f"{node_options} --max-old-space-size={NODE_HEAP_MB}".strip()
    out.update(KIMI_CODE_HOME=str(home), KIMI_CODE_NO_AUTO_UPDATE="1", KIMI_DISABLE_TELEMETRY="1",
               KIMI_LOOP_MAX_ATTEMPTS_PER_STEP="1", NODE_OPTIONS=node_options)
    return out


def kimi_code_session_cwd(work: Path) -> str:
    """The cwd a Kimi Code session is opened with. Kimi Code 2.1 appends a `<system-reminder>` user message with
    today's date to a new session's first request unless the agent's environment cwd (normalised) differs from
    the session's (as given): a trailing slash is that difference, so the model sees our system prompt and the
    prompt, nothing else. No setting turns the reminder off; tests/test_acp.py checks every request."""
    return str(work).rstrip("/") + "/"


@dataclass
class SessionRecord:
    usage: dict[str, float]
    error: dict | None  # the failed turn's error (code, message, details.statusCode)
    ended: bool  # the turn's end is written


_USAGE_KEYS = {"inputOther": "input_other", "output": "output", "inputCacheRead": "input_cache_read",
               "inputCacheCreation": "input_cache_creation"}  # kimi-cli 1.x's names for the same counts


def kimi_code_session(home: Path, sid: str) -> SessionRecord:
    """What a Kimi Code session's own record says that ACP does not: the tokens its calls used, and why its last
    turn failed (over ACP a provider's 429 or 400 is an empty answer). Kimi Code writes the record a moment after
    it answers (measured: 50-200 ms); `ended` says whether the turn's end is in it yet."""
    usage: dict[str, float] = {}
    error, ended = None, False
    session = _session_dir(home, sid)
    try:
        lines = (session / "agents" / "main" / "wire.jsonl").read_bytes().splitlines() if session else []
    except FileNotFoundError:
        lines = []
    for line in lines:
        if b'"usage.record"' not in line and b'"turn.ended"' not in line:
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a line still being written
        if entry.get("type") == "usage.record" and isinstance(entry.get("usage"), dict):
            for k, v in entry["usage"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    name = _USAGE_KEYS.get(k, k)
                    usage[name] = usage.get(name, 0) + v
        elif entry.get("type") == "turn.ended":
            ended = True
            error = entry.get("error") if entry.get("reason") == "failed" else None
    return SessionRecord(usage, error if isinstance(error, dict) else None, ended)


def _session_dir(home: Path, sid: str) -> Path | None:
    """Where Kimi Code keeps session `sid` (`sessions/wd_<workspace>/<sid>`): every session of one process shares
    the workspace folder, found once, not globbed per read."""
    workspace = _workspaces.get(home)
    if workspace is None or not (workspace / sid).is_dir():
        found = next(home.glob(f"sessions/*/{sid}"), None)
        if found is None:
            return None
        workspace = _workspaces[home] = found.parent
    return workspace / sid


_workspaces: dict[Path, Path] = {}


def kimi_code_model(env: dict[str, str]) -> str:
    """The model Kimi Code will use: the endpoint's, else the user's default_model."""
    if ep := endpoint(env):
        return ep[2] or "default"
    return _default_model(user_kimi_code_home(env) / "config.toml")


# ------------------------------------------------------------------ kimi-cli 1.x (wire, print)


def kimi_cli_share(share: Path, env: dict[str, str], config_file: str) -> list[str]:
    """A private KIMI_SHARE_DIR linked to the user's credentials; returns the extra argv (`--config-file` of the
    user's config when no endpoint and no HEGELION_KIMI_CONFIG_FILE says otherwise). With --config-file kimi-cli
    never rewrites the file (it only saves a config in its own default place)."""
    share.mkdir(parents=True, exist_ok=True, mode=0o700)
    if config_file:
        return ["--config-file", config_file]
    if endpoint(env):
        return []
    user = user_share_dir(env)
    for name in ("credentials", "device_id"):
        _link(user / name, share / name)
    return ["--config-file", str(user / "config.toml")] if (user / "config.toml").is_file() else []


def kimi_cli_model(env: dict[str, str]) -> str:
    if endpoint(env):
        return env.get("KIMI_MODEL_NAME", "")
    return _default_model(user_share_dir(env) / "config.toml")


def _default_model(config: Path) -> str:
    import tomllib

    try:
        return str(tomllib.loads(config.read_text(encoding="utf-8")).get("default_model") or "")
    except (OSError, ValueError):
        return ""
