"""Secrets never leave: the masking rules alone, then a run whose every user-set input holds a distinct planted
secret — teacher argv, environment, URLs, the dataset path, the Redis password — enqueued, answered by worker
processes and exported with `export --format hf`: no planted secret is in any exported file or in the provenance
kept in Redis."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from hegelion_queue import redact

from .redis_server import RedisServer
from .test_generator_e2e import wait_finished, workers  # noqa: F401  (fixture)


@pytest.mark.parametrize("line,masked", [
    ("llm -m gpt-4o --key sk-live-0123456789abcdefghij", "llm -m gpt-4o --key '***'"),
    ("llm -m gpt-4o --key plainvalue", "llm -m gpt-4o --key '***'"),
    ("llm --api-key=abc123 -m x", "llm '--api-key=***' -m x"),
    ("tool --openai-api-key K --password 'p w' --max-tokens 100 --token-budget 5",
     "tool --openai-api-key '***' --password '***' --max-tokens 100 --token-budget 5"),
    ("curl -H 'Authorization: Bearer abcdefgh12345' -H 'X-Api-Key: k1'",
     "curl -H 'Authorization: Bearer ***' -H 'X-Api-Key: ***'"),
    ("env OPENAI_API_KEY=zz llm -m x", "env 'OPENAI_API_KEY=***' llm -m x"),
    ("tool https://bob:pw@api.example/v1?api_key=k&model=m",
     "tool 'https://bob:***@api.example/v1?api_key=***&model=m'"),
    ("git clone https://ghp_0123456789abcdefghijklmn@github.com/x/y", "git clone 'https://***@github.com/x/y'"),
    ("tool --token --model m", "tool --token --model m"),  # a flag, not a value
    ("llm -m 'gpt 4o'", "llm -m 'gpt 4o'"),  # nothing secret: unchanged
])
def test_command_lines_keep_their_shape_and_lose_their_secrets(line, masked):
    assert redact.command(line) == masked


def test_text_env_and_data():
    assert redact.text("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact.text("https://api.example/v1?token=t&sig=s&page=2") == (
        "https://api.example/v1?token=***&sig=***&page=2")
    assert redact.text('unbalanced "quote --key v') == 'unbalanced "quote --key ***'
    assert redact.text("HuggingFaceH4/ultrafeedback_binarized kimi-default /data/max_tokens=5") == (
        "HuggingFaceH4/ultrafeedback_binarized kimi-default /data/max_tokens=5")
    assert redact.env("KIMI_API_KEY", "abc") == redact.env("DB_PASSWORD", "x") == redact.env("HF_TOKEN", "y") == "***"
    assert redact.env("KIMI_BASE_URL", "https://u:p@h/v1") == "https://u:***@h/v1"
    assert redact.env("KIMI_MODEL_NAME", "kimi-k2") == "kimi-k2"
    config = {"teacher": {"version": "llm --key k", "endpoint": "https://u:p@h"}, "api_key": "k", "max_tokens": 5}
    assert redact.data(config) == {"teacher": {"version": "llm --key ***", "endpoint": "https://u:***@h"},
                                   "api_key": "***", "max_tokens": 5}


TEACHER = '''import sys
sys.stdin.read()
print("<thought>\\n**THESIS**: The first position holds that it deserves a direct answer.\\n"
      "**ANTITHESIS**: Against that, a direct answer can hide trade-offs, exceptions and costs.\\n"
      "**SYNTHESIS**: A good answer states the main position and names the conditions where it fails.\\n"
      "</thought>\\nFinal answer: it depends on the conditions named above.")
'''


def everything_in(folder: Path) -> bytes:
    """Every file's bytes, and every parquet file's values decoded (its pages may be compressed)."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        out.append(path.read_bytes())
        if path.suffix == ".parquet":
            out.append(orjson.dumps(pq.read_table(path).to_pylist()))
    return b"\n".join(out)


@pytest.mark.e2e
def test_e2e_no_planted_secret_is_exported_or_kept_in_the_provenance(hq, workers, env, tmp_path,  # noqa: F811
                                                                      monkeypatch):
    s = {name: f"PLANTED{name}{i}x7Q" for i, name in enumerate([
        "flag", "flageq", "bearer", "urlpw", "urlquery", "password", "shape", "kimikey", "kimiurlpw", "kimiquery",
        "openai", "service", "db", "hf", "datapath", "redis"])}
    s["shape"] = f"sk-{s['shape']}abcdefghijk"
    server = RedisServer(tmp_path / "pw-redis", password=s["redis"])
    server.start()
    try:
        teacher = tmp_path / "teacher.py"
        teacher.write_text(TEACHER)
        for name, value in {
            "HEGELION_REDIS_URL": server.url,
            "KIMI_API_KEY": s["kimikey"],
            "KIMI_BASE_URL": f"https://carol:{s['kimiurlpw']}@kimi.example/v1?token={s['kimiquery']}",
            "OPENAI_API_KEY": s["openai"], "MY_SERVICE_SECRET": s["service"], "DB_PASSWORD": s["db"],
            "HF_TOKEN": s["hf"], "HEGELION_KIMI_MODE": "print",
        }.items():
            monkeypatch.setenv(name, value)
        command_teacher = {
            "HEGELION_TEACHER": "command",
            "HEGELION_TEACHER_CMD": (f"{sys.executable} {teacher} --key {s['flag']} --api-key={s['flageq']} -H "
                                     f"'Authorization: Bearer {s['bearer']}' --endpoint 'https://bob:{s['urlpw']}@llm."
                                     f"example/v1?api_key={s['urlquery']}&model=m' --password {s['password']} "
                                     f"{s['shape']}"),
        }
        prompts = tmp_path / f"prompts?api_key={s['datapath']}.txt"
        prompts.write_text("".join(f"Should village {i} keep its bus line running at night?\n" for i in range(6)))
        hq("enqueue", "--prompts-file", str(prompts), "--run", "leak", "--limit", "3")  # the kimi preset's config
        hq("enqueue", "--prompts-file", str(prompts), "--run", "leak", "--allow-config-change",
           extra_env=command_teacher)  # and the command preset's
        monkeypatch.setenv("HEGELION_TEACHER", command_teacher["HEGELION_TEACHER"])
        monkeypatch.setenv("HEGELION_TEACHER_CMD", command_teacher["HEGELION_TEACHER_CMD"])
        workers(1)
        r = server.client()
        wait_finished(r, "leak", timeout=60)
        assert int(r.scard("hegelion:run:leak:done")) == 6
        hq("export", "--format", "hf", str(tmp_path / "out"), "--run", "leak")

        exported = everything_in(tmp_path / "out")
        provenance = b"\n".join([*r.hvals("hegelion:run:leak:configs"), *r.lrange("hegelion:run:leak:commands", 0, -1),
                                 *r.hvals("hegelion:run:leak:meta")])
        for name, secret in s.items():
            assert secret.encode() not in exported, f"planted secret {name!r} is in the exported folder"
            assert secret.encode() not in provenance, f"planted secret {name!r} is in the provenance kept in Redis"
        card = (tmp_path / "out" / "README.md").read_text()
        assert f"on {socket.gethostname()}" not in card and "host" not in orjson.loads(
            r.lrange("hegelion:run:leak:commands", 0, -1)[0])
        # masked, not dropped: the card still says which teacher ran and how
        assert "--key ***" in card and "Bearer ***" in card and "https://carol:***@kimi.example/v1?token=***" in card
        assert "hegelion-queue enqueue --prompts-file" in card and "api_key=***" in card
    finally:
        server.stop()
