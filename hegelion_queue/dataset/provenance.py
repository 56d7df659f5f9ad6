"""Where a run's samples come from: its configuration and the commands that made it, with secrets masked
(redact.py) before anything is stored: the dataset card publishes both.

The configuration (teacher preset, its version, model, prompts, parser settings, sampling seed and source) is
stored once per run, under a 16-hex-digit fingerprint id; every job and every sample carries only that id, and
the export resolves it. Enqueueing into a run with a different configuration is refused, unless the user allows
the change: then both are kept, and each sample says which one made it.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis

from ..teacher import kimi as kimi_setup
from .. import redact
from ..dialectic import PROMPT_FRAME, TEACHER_PROMPT
from ..errors import HegelionError
from ..keys import RunKeys
from ..settings import Settings
from ..teacher.presets import teacher_model

ID_CHARS = 16

# Record the configuration unless the run has another one and no change is allowed: then return that one,
# and write nothing. A run from before fingerprints (no config_id) takes this one.
RECORD_LUA = """
local meta, configs = KEYS[1], KEYS[2]
local id, entry, allow = ARGV[1], ARGV[2], ARGV[3]
local current = redis.call('HGET', meta, 'config_id')
if current and current ~= id and allow ~= '1' then return current end
redis.call('HSETNX', configs, id, entry)
redis.call('HSET', meta, 'config_id', id)
return id
"""


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def teacher_version(s: Settings) -> str:
    """`kimi --version` (its first line), or for the command and acp presets their argv (secrets masked): what
    says which teacher ran. The probe is bounded and dies with us (kimi_setup.kimi_version)."""
    if s.teacher != "kimi":
        return redact.command(s.teacher_cmd if s.teacher == "command" else s.acp_command)
    return kimi_setup.kimi_version(s.kimi_bin)


def configuration(s: Settings, sampling: dict[str, Any]) -> dict[str, Any]:
    """The run's configuration: what decides its samples' content (not how fast or where they are made), with
    secrets masked (a key in the command preset's argv, credentials in KIMI_BASE_URL): rotating a key is not a
    change of configuration."""
    teacher: dict[str, Any] = {"preset": s.teacher, "version": teacher_version(s), "model": teacher_model(s)}
    if s.teacher == "kimi":
        teacher["endpoint"] = redact.env("KIMI_BASE_URL", os.environ.get("KIMI_BASE_URL", ""))
        if s.kimi_config_file:
            try:
                teacher["config_file_sha256"] = hashlib.sha256(Path(s.kimi_config_file).read_bytes()).hexdigest()
            except OSError as e:
                teacher["config_file_sha256"] = f"unreadable ({e.strerror})"
    return redact.data({
        "teacher": teacher,
        "system_prompt_sha256": _sha256(TEACHER_PROMPT),
        "prompt_frame_sha256": _sha256(PROMPT_FRAME),
        "parser": {"min_section_chars": s.min_section_chars},
        "sampling": sampling,
    })


def config_id(config: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(config, option=orjson.OPT_SORT_KEYS)).hexdigest()[:ID_CHARS]


TEACHER_PARTS = ("teacher", "system_prompt_sha256", "prompt_frame_sha256", "parser")


def teacher_id(config: dict[str, Any]) -> str:
    """What decides a prompt's answer, without how the run sampled its prompts: the teacher (preset, version, model,
    endpoint), its instructions and the parser. Two runs with the same id would pay for the same answer: the answer
    cache is keyed by it (keys.answer_cache)."""
    return config_id({k: config.get(k) for k in TEACHER_PARTS})


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed, one `key: old -> new` a field."""
    a, b = flat(old), flat(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


async def record(redis: Redis, rk: RunKeys, config: dict[str, Any], allow_change: bool = False) -> str:
    """Store the configuration with the run and return its id; refuse (HegelionError, nothing written) when the run
    was made with another one, unless `allow_change`."""
    cid = config_id(config)
    entry = orjson.dumps({"config": config, "recorded_at": time.time()})
    got = (await redis.eval(RECORD_LUA, 2, rk.meta, rk.configs, cid, entry, int(allow_change))).decode()
    if got == cid:
        return cid
    old = (await configs(redis, rk)).get(got, {}).get("config", {})
    changed = "; ".join(differences(old, config)) or "unknown fields"
    raise HegelionError(
        f"run {rk.run} was made with configuration {got}, this one is {cid} ({changed}): use another --run, or "
        f"add --allow-config-change to mix them in one run (both are recorded, each sample names its own)"
    )


async def configs(redis: Redis, rk: RunKeys) -> dict[str, dict[str, Any]]:
    """Every configuration the run had: id -> {config, recorded_at}."""
    return {k.decode(): orjson.loads(v) for k, v in (await redis.hgetall(rk.configs)).items()}


def command_line(argv: list[str] | None = None) -> str:
    """This process' command, as a user would type it again, secrets masked."""
    args = sys.argv[1:] if argv is None else argv
    return redact.command(shlex.join(["hegelion-queue", *args]))


async def record_command(redis: Redis, rk: RunKeys, command: str) -> None:
    """The command joins the run's list (no host name: the list is published with the dataset)."""
    if command:
        entry = {"at": time.time(), "command": redact.command(command)}
        await redis.rpush(rk.commands, orjson.dumps(entry))


async def commands(redis: Redis, rk: RunKeys) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in await redis.lrange(rk.commands, 0, -1)]
