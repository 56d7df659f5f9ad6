"""The ACP teacher: sessions in long-lived `kimi acp` processes (the fake Kimi Code, tests/fake_acp.py, as a real
subprocess; the real Kimi Code in tests/test_kimi_code.py), and any ACP agent through HEGELION_TEACHER=acp."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from pathlib import Path

import orjson
import pytest

from hegelion_queue.teacher import acp
from hegelion_queue.dialectic import TEACHER_PROMPT, frame
from hegelion_queue.teacher.presets import ConfigError, Teacher, TransientError

from .conftest import FAKE_KIMI, ROOT, make_teacher, run_teacher as run

FAKE_ACP = ROOT / "tests" / "fake_acp.py"


@pytest.fixture
def acp_teacher(env, tmp_path, monkeypatch):
    """A Teacher whose kimi is the fake Kimi Code, pointed at an endpoint (the fake needs a model configured)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no login of the machine's user leaks in
    monkeypatch.setenv("FAKE_ACP_LOG", str(tmp_path / "fake_acp.log"))
    for k, v in {"KIMI_BASE_URL": "http://127.0.0.1:9/v1", "KIMI_API_KEY": "test-key",
                 "KIMI_MODEL_NAME": "test-model"}.items():
        monkeypatch.setenv(k, v)

    def make(**overrides) -> Teacher:
        overrides.setdefault("kimi_bin", str(FAKE_ACP))
        return make_teacher(monkeypatch, tmp_path / "teacher", **overrides)

    return make


def ask_all(t: Teacher, prompts: list[str]) -> list:
    async def go():
        return await asyncio.gather(*(t.ask(p) for p in prompts), return_exceptions=True)

    return run(t, go)


def events(tmp_path: Path, kind: str | None = None) -> list[dict]:
    path = tmp_path / "fake_acp.log"
    rows = [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []
    return [r for r in rows if kind is None or r["event"] == kind]


def tagged(prompt: str) -> str:
    return f"[sha256:{hashlib.sha256(frame(prompt).encode()).hexdigest()}]"


def test_auto_mode_runs_kimi_code_over_acp_a_fresh_session_per_prompt(acp_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_ACP_DELAY", "0.3")
    t = acp_teacher(max_jobs=4)
    prompts = [f"Question number {i}: is it worth it?" for i in range(12)]
    t0 = time.monotonic()
    answers = ask_all(t, prompts)
    took = time.monotonic() - t0
    assert t.protocol == "acp"
    for p, a in zip(prompts, answers):
        assert a.text.endswith(tagged(p)) and a.reasoning == "Weighing both sides."
        assert a.usage == {"input_other": 50, "output": 40, "input_cache_read": 0}  # from the session's record
    assert len(events(tmp_path, "start")) == 1, "one process holds every session"
    sessions = {e["session"] for e in events(tmp_path, "prompt")}
    assert len(sessions) == 12, "a fresh session per prompt: no context carries over"
    assert {e["session"] for e in events(tmp_path, "delete")} == sessions  # a delete closes a session too
    assert [e["text"] for e in sorted(events(tmp_path, "prompt"), key=lambda e: e["text"])] == sorted(
        frame(p) for p in prompts)
    assert took < 12 * 0.3, "sessions run concurrently"


def test_the_private_home_holds_the_teacher_agent_and_the_endpoint(acp_teacher, tmp_path):
    t = acp_teacher()
    run(t, lambda: t.ask("q"))
    start = events(tmp_path, "start")[0]
    home = Path(start["home"])
    assert home.is_relative_to(t.home), "a private KIMI_CODE_HOME, not the user's"
    assert start["argv"] == ["acp"]
    agent = start["agent"]
    assert "override: true" in agent and "tools: []" in agent and "description:" in agent  # no description: ignored
    assert agent.rstrip().endswith(TEACHER_PROMPT)
    assert "${" not in TEACHER_PROMPT  # Kimi Code fills in ${...} in an agent's body
    assert events(tmp_path, "prompt")[0]["cwd"].endswith("/"), "a session cwd that keeps the date reminder out"
    assert events(tmp_path, "initialize")[0]["client"] == {"fs": {"readTextFile": False, "writeTextFile": False},
                                                           "terminal": False}
    assert not home.exists(), "the process's home goes with it"


@pytest.mark.parametrize("mode, error, text", [
    ("error429", TransientError, "429"),
    ("error500", TransientError, "500"),
    ("error400", ConfigError, "400"),
    ("error401", ConfigError, "401"),
    ("empty", TransientError, "empty answer"),
    ("garbage", TransientError, "garbage"),
    ("crash", TransientError, "exited -9"),
])
def test_errors_map_to_retry_or_fix_the_set_up(acp_teacher, mode, error, text):
    t = acp_teacher()
    with pytest.raises(error, match=text) as e:
        run(t, lambda: t.ask(f"[[fake:{mode}]] q"))
    if mode in ("error429", "error500", "error400"):  # the failed call's tokens still count (budgets)
        assert e.value.usage == {"input_other": 50, "output": 0}


def test_no_model_and_no_login_is_a_config_error(acp_teacher, monkeypatch):
    for k in ("KIMI_BASE_URL", "KIMI_API_KEY", "KIMI_MODEL_NAME"):
        monkeypatch.delenv(k)
    t = acp_teacher()
    with pytest.raises(ConfigError, match="needs a login or a model"):
        run(t, lambda: t.ask("q"))


def test_a_process_that_dies_fails_its_prompts_as_transient_and_is_started_again(acp_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_ACP_DELAY", "1")
    t = acp_teacher(max_jobs=4)

    async def go():
        first = await asyncio.gather(t.ask("[[fake:crash]] a"), t.ask("[[fake:hang]] b"), t.ask("[[fake:hang]] c"),
                                     return_exceptions=True)
        return first, await t.ask("after the crash")

    first, after = run(t, go)
    assert all(isinstance(r, TransientError) for r in first), first
    assert after.text.endswith(tagged("after the crash"))
    starts = events(tmp_path, "start")
    assert len(starts) == 2 and starts[0]["pid"] != starts[1]["pid"]


def test_deadline_cancels_the_session_and_keeps_the_process(acp_teacher, tmp_path):
    t = acp_teacher(teacher_timeout=1)

    async def go():
        t0 = time.monotonic()
        with pytest.raises(TransientError, match="timed out after 1s"):
            await t.ask("[[fake:hang]] q")
        took = time.monotonic() - t0
        return took, await t.ask("next")

    took, after = run(t, go)
    assert took < 1.8 and after.text.endswith(tagged("next"))
    hung = events(tmp_path, "prompt")[0]["session"]
    assert [e["session"] for e in events(tmp_path, "cancel")] == [hung]
    assert hung in {e["session"] for e in events(tmp_path, "delete")}
    assert len(events(tmp_path, "start")) == 1


def test_a_turn_that_ignores_cancel_retires_its_process(acp_teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(acp, "CANCEL_GRACE", 0.5)
    t = acp_teacher(teacher_timeout=1)

    async def go():
        with pytest.raises(TransientError, match="timed out"):
            await t.ask("[[fake:stuck]] q")
        await asyncio.sleep(0.8)  # the grace passes: the process retires, its slot is free
        return await t.ask("next")

    assert run(t, go).text.endswith(tagged("next"))
    starts = events(tmp_path, "start")
    assert len(starts) == 2
    assert events(tmp_path, "prompt")[-1]["pid"] == starts[1]["pid"]


def test_a_cancelled_job_cancels_its_session_and_the_pool_stays_healthy(acp_teacher, tmp_path):
    t = acp_teacher()

    async def go():
        job = asyncio.create_task(t.ask("[[fake:hang]] abort me"))
        await asyncio.sleep(1.5)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        return await t.ask("next")

    assert run(t, go).text.endswith(tagged("next"))
    assert len(events(tmp_path, "cancel")) == 1 and len(events(tmp_path, "start")) == 1


def test_a_tool_call_is_refused_and_runs_nothing(acp_teacher, tmp_path, monkeypatch):
    target = tmp_path / "pwned"
    monkeypatch.setenv("FAKE_ACP_TOOL_FILE", str(target))
    t = acp_teacher()
    answer = run(t, lambda: t.ask("[[fake:tool]] please run a command"))
    assert answer.text.startswith("<thought>"), "the answer is what follows the tool call"
    assert not target.exists()
    assert events(tmp_path, "permission")[0]["outcome"] == {"outcome": "selected", "optionId": "reject"}
    assert events(tmp_path, "fs")[0]["error"]["code"] == -32601  # no file system for the agent


def test_output_over_the_cap_breaks_the_process(acp_teacher, monkeypatch):
    monkeypatch.setenv("FAKE_ACP_HUGE_MB", "2")
    t = acp_teacher(teacher_output_cap=1024 * 1024)
    with pytest.raises(TransientError, match="over 1048576 bytes"):
        run(t, lambda: t.ask("[[fake:huge]] q"))


def test_processes_hold_sessions_up_to_their_limit_and_recycle(acp_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_ACP_DELAY", "0.5")
    t = acp_teacher(max_jobs=4, acp_processes=2, acp_sessions=2)
    ask_all(t, [f"q{i}" for i in range(4)])
    assert len({e["pid"] for e in events(tmp_path, "prompt")}) == 2
    (tmp_path / "fake_acp.log").unlink()
    monkeypatch.setenv("FAKE_ACP_DELAY", "0")
    t = acp_teacher(max_jobs=1, acp_processes=1, acp_sessions=1, acp_recycle=3)

    async def seven():
        return [await t.ask(f"r{i}") for i in range(7)]

    run(t, seven)
    pids = [e["pid"] for e in events(tmp_path, "prompt")]
    assert [pids.count(p) for p in dict.fromkeys(pids)] == [3, 3, 1]


def test_any_acp_agent_through_the_acp_preset(acp_teacher, tmp_path, monkeypatch):
    t = acp_teacher(teacher="acp", acp_command=f"{sys.executable} {FAKE_ACP} acp")
    answer = run(t, lambda: t.ask("Is it?"))
    assert "**THESIS**" in answer.text
    start, prompt = events(tmp_path, "start")[0], events(tmp_path, "prompt")[0]
    assert start["home"] == "" and start["argv"] == ["acp"]  # run as it is, no KIMI_CODE_HOME of ours
    assert prompt["text"] == f"{TEACHER_PROMPT}\n\n{frame('Is it?')}"  # no system prompt of ours: it comes first
    with pytest.raises(ConfigError, match="HEGELION_ACP_COMMAND"):
        t = acp_teacher(teacher="acp", acp_command="")
        run(t, lambda: t.ask("q"))
    with pytest.raises(ConfigError, match="not found"):
        t = acp_teacher(teacher="acp", acp_command="/nonexistent/agent acp")
        run(t, lambda: t.ask("q"))


def test_modes_that_the_installed_kimi_does_not_have_are_config_errors(acp_teacher):
    t = acp_teacher(kimi_mode="wire")
    with pytest.raises(ConfigError, match="no wire mode"):
        run(t, lambda: t.ask("q"))
    t = acp_teacher(kimi_mode="acp", kimi_bin=str(FAKE_KIMI))
    with pytest.raises(ConfigError, match="kimi-cli"):
        run(t, lambda: t.ask("q"))


def test_kimi_code_print_mode(acp_teacher, tmp_path, monkeypatch):
    t = acp_teacher(kimi_mode="print")
    answer = run(t, lambda: t.ask("Is it?"))
    assert answer.text.endswith(tagged("Is it?"))
    call = events(tmp_path, "prompt")[0]
    assert call["argv"][:2] == ["-p", frame("Is it?")] and "tools: []" in call["agent"]
    with pytest.raises(TransientError, match="429"):
        run(t, lambda: t.ask("[[fake:error429]] q"))
    for k in ("KIMI_BASE_URL", "KIMI_API_KEY", "KIMI_MODEL_NAME"):
        monkeypatch.delenv(k)
    with pytest.raises(ConfigError, match="No model configured"):
        run(t, lambda: t.ask("q"))


def test_a_users_kimi_code_login_is_seen_and_never_copied(acp_teacher, tmp_path, monkeypatch):
    """No endpoint set: the user's ~/.kimi-code config and credentials reach the process through links, its
    sessions stay in its private home, and the user's folder is not written (but for kimi's refresh lock dir)."""
    for k in ("KIMI_BASE_URL", "KIMI_API_KEY", "KIMI_MODEL_NAME"):
        monkeypatch.delenv(k)
    user = tmp_path / "home" / ".kimi-code"
    (user / "credentials").mkdir(parents=True)
    (user / "config.toml").write_text('default_model = "m"\n[models.m]\nprovider = "p"\nmodel = "x"\n'
                                      'max_context_size = 1000\n[providers.p]\ntype = "kimi"\nbase_url = "http://x"\n'
                                      'api_key = ""\n')
    (user / "credentials" / "kimi-code.json").write_text('{"access_token": "at-1"}')
    before = sorted(p.relative_to(user) for p in user.rglob("*"))
    t = acp_teacher()

    async def go():
        answer = await t.ask("q")
        home = Path(events(tmp_path, "start")[0]["home"])
        return answer, {p.name: (p.is_symlink(), p.resolve()) for p in home.iterdir()}

    answer, linked = run(t, go)
    assert "**THESIS**" in answer.text
    assert linked["config.toml"] == (True, user / "config.toml")
    assert linked["credentials"] == (True, user / "credentials")
    assert linked["oauth"] == (True, user / "oauth")
    assert sorted(p.relative_to(user) for p in user.rglob("*")) == sorted([*before, Path("oauth")])
    assert os.environ.get("KIMI_CODE_HOME") is None
