"""Secrets out of everything a run records or publishes: provenance (configuration, commands), the dataset card and
the exported rows. One place decides what a secret looks like; every writer calls it.

A user can put a secret in a teacher's argv (`--key sk-…`, `--api-key=…`, `-H "Authorization: Bearer …"`), in an
environment value (`KIMI_API_KEY`, `KIMI_BASE_URL=https://user:pass@…`, anything named *_KEY, *_TOKEN, *_SECRET,
*PASSWORD*), in a URL (user:password@, `?api_key=`, `&token=`) or in a command line holding any of these. What is
recognised is replaced by `***`; what is kept (flag names, hosts, paths, model names) says which teacher ran.
A secret with no name and no known shape (a bare positional argument) cannot be told apart from a model name.
"""

from __future__ import annotations

import functools
import re
import shlex
from typing import Any

MASK = "***"

# A name that holds a secret: an argv flag (`--openai-api-key`), an environment variable (`HF_TOKEN`), a query
# parameter (`access_token`), a JSON key. The last word decides: `max_tokens` and `token_budget` are not secrets.
_SECRET_WORD = (r"(?:api[_-]?key|apikey|key|token|secret|passw(?:or)?d|pass|pwd|auth|authorization|credentials?|sig"
                r"|signature|cookie)")
SECRET_NAME = re.compile(rf"(?i)(?:^|[_.-]){_SECRET_WORD}$|passw(?:or)?d")

_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/\s@?#:]*)(:[^/\s@?#]*)?@")
_QUERY_VALUE = re.compile(r"(?i)([?&;])([\w.-]+)=([^&#\s\"']*)")
_FLAG_VALUE = re.compile(r"(?<!\S)(--[\w.-]+)(=|\s+)(?!-)(\"[^\"]*\"|'[^']*'|\S+)")
_AUTHORIZATION = re.compile(r"(?i)\b(authorization\s*[:=]\s*[\"']?)(?:(bearer|basic|token|digest)(\s+))?[^\s\"',;]+")
_BEARER = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}")
_NAMED_VALUE = re.compile(r"(?i)(?<![\w.-])([\w.-]*?(?:api[_-]?key|apikey|token|secret|passw(?:or)?d|pwd|credentials?))"
                          r"(\s*[:=]\s*)([\"']?)([^\s\"'&,;]+)")
_KNOWN_SHAPES = re.compile(  # provider keys recognisable wherever they are
    r"\b(?:sk-[A-Za-z0-9_-]{16,}|sk_(?:live|test)_[A-Za-z0-9]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|github_pat_[A-Za-z0-9_]{20,}|xox[abprs]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})"
)


def _userinfo(m: re.Match[str]) -> str:
    """user:password@ keeps the user; a lone user@ may be a token itself (https://<token>@github.com)."""
    scheme, user, password = m.groups()
    return f"{scheme}{user}:{MASK}@" if password is not None else f"{scheme}{MASK}@"


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name.strip().lstrip("-")))


@functools.lru_cache(maxsize=4096)  # exported rows repeat the same few strings (source, teacher model)
def text(value: str) -> str:
    """Free text (a URL, a header, a command line, a path) with every recognisable secret masked: URL credentials
    and secret query parameters, `--secret-flag value`, `Authorization:` and `Bearer` credentials, `api_key=V` /
    `X-Api-Key: V`, and provider keys by their shape (sk-…, hf_…, ghp_…, AKIA…, JWTs)."""
    value = _URL_USERINFO.sub(_userinfo, value)
    value = _QUERY_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)}={MASK}" if is_secret_name(m.group(2))
                             else m.group(0), value)
    value = _FLAG_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}" if is_secret_name(m.group(1))
                            else m.group(0), value)
    value = _AUTHORIZATION.sub(lambda m: f"{m.group(1)}{m.group(2) or ''}{m.group(3) or ''}{MASK}", value)
    value = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", value)
    value = _NAMED_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}{MASK}", value)
    return _KNOWN_SHAPES.sub(MASK, value)


def _argv(args: list[str]) -> list[str]:
    """The value of every secret flag masked: `--key V`, `--api-key=V`."""
    out: list[str] = []
    secret_next = False
    for arg in args:
        flag, eq, _ = arg.partition("=")
        if secret_next and not arg.startswith("-"):
            arg = MASK
        elif arg.startswith("-") and eq and is_secret_name(flag):
            arg = f"{flag}={MASK}"
        out.append(arg)
        secret_next = arg.startswith("--") and not eq and is_secret_name(arg)
    return out


def command(line: str) -> str:
    """A command line with its secrets masked, as a shell would split it (quoted values and all)."""
    masked = text(line)
    try:
        return shlex.join(_argv(shlex.split(masked)))
    except ValueError:  # unbalanced quotes: not an argv, still text
        return masked


def env(name: str, value: str) -> str:
    """An environment value as it may be recorded: masked whole when its name says secret, else as text."""
    return MASK if value and is_secret_name(name) else text(value)


def data(value: Any) -> Any:
    """A JSON-like value (a configuration, a command record) with secrets masked: values under a secret key whole,
    every string as text."""
    if isinstance(value, dict):
        return {k: (MASK if is_secret_name(str(k)) and v not in ("", None) else data(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [data(v) for v in value]
    return text(value) if isinstance(value, str) else value
