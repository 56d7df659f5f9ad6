"""The pool of long-lived `kimi --wire` processes, with the fake kimi (and the real kimi-cli when installed)
as real subprocesses."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import orjson
import pytest

from hegelion_queue.teacher import wire as kimi_wire
from hegelion_queue.dialectic import TEACHER_PROMPT, frame
from hegelion_queue.teacher.presets import ConfigError, Teacher, TransientError

from .conftest import FAKE_KIMI, make_teacher, run_teacher as run
from .openai_server import ChatServer
from .real_kimi import real_kimi


REAL_KIMI = real_kimi()
KIMIS = [
    pytest.param(str(FAKE_KIMI), id="fake"),
    pytest.param(REAL_KIMI, id="real", marks=pytest.mark.skipif(
        REAL_KIMI is None, reason="kimi-cli 1.51.0 not installed: `make kimi-legacy` or set HEGELION_TEST_KIMI_BIN")),
]


def point_kimi_at(server: ChatServer, monkeypatch) -> None:
    """kimi's own variables: its default provider talks to our local OpenAI-compatible server."""
    monkeypatch.setenv("KIMI_BASE_URL", server.base_url)
    monkeypatch.setenv("KIMI_API_KEY", "test-key")
    monkeypatch.setenv("KIMI_MODEL_NAME", "test-model")


@pytest.fixture
def wire(env, tmp_path, monkeypatch):
    """A Teacher in wire mode; `run(t, coro)` runs coro in an event loop, then closes the teacher."""

    def make(**overrides) -> Teacher:
        monkeypatch.setenv("HEGELION_KIMI_MODE", "wire")
        return make_teacher(monkeypatch, tmp_path / "teacher", **overrides)

    return make


def prompts_logged(env) -> list[dict]:
    path = Path(env["FAKE_KIMI_LOG"])
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_one_process_answers_prompt_after_prompt_each_from_a_cleared_context(wire, env):
    t = wire(max_jobs=1)
    prompts = ["first", "second", "[[fake:exit75]] rate limited", "third", "[[fake:invalid]] fourth", "fifth"]

    async def go():
        out = []
        for p in prompts:
            try:
                out.append(await t.ask(p))
            except TransientError as e:
                out.append(e)
        return out

    answers = run(t, go)
    assert isinstance(answers[2], TransientError) and "429" in str(answers[2])
    assert answers[0].reasoning == "Weighing both sides." and "**THESIS**" in answers[0].text
    assert answers[0].usage == {"input_other": 120, "output": 80, "input_cache_read": 0, "input_cache_creation": 0}
    calls = prompts_logged(env)
    assert [c["stdin"] for c in calls] == [frame(p) for p in prompts]
    assert len({c["pid"] for c in calls}) == 1, "one long-lived process answers every prompt"
    assert [c["context"] for c in calls] == [1] * len(prompts), "every prompt starts from an empty context"
    assert [c["clears"] for c in calls] == list(range(len(prompts)))  # a /clear after each, failed ones too
    assert calls[0]["argv"][:3] == ["--wire", "--agent-file", str(t.agent_file)]
    assert "tools: []" in calls[0]["agent"]
    assert Path(calls[0]["share_dir"]).parent.parent == t.home / "wire"


@pytest.mark.parametrize("kimi", KIMIS)
def test_every_prompt_reaches_the_model_with_only_system_and_user_messages(wire, env, monkeypatch, kimi):
    """Context isolation, shown by a server that records each request: the fake kimi sends its whole
    context as kimi does, so a missing or failed /clear would show up here as extra messages."""
    prompts = ["What is justice?", "Is tea better than coffee?", "[[status:400]] a rejected request",
               "Should cities ban cars?", "[[status:429]] rate limited", "Why is the sky blue?"]
    if kimi == REAL_KIMI:
        prompts.remove("[[status:429]] rate limited")  # kimi retries a 429 three times itself (~6 s)
    with ChatServer() as server:
        point_kimi_at(server, monkeypatch)
        t = wire(kimi_bin=kimi, max_jobs=1, teacher_timeout=60)  # a loaded host starts kimi slowly

        async def go():
            results = []
            for p in prompts:
                try:
                    results.append(await t.ask(p))
                except (TransientError, ConfigError) as e:
                    results.append(e)
            return results, t.pool.started

        results, started = run(t, go)
        bodies = server.chat_bodies()
    assert started == 1, "one process answered every prompt"
    assert isinstance(results[2], ConfigError) and "400" in str(results[2])
    assert [r.text.endswith(f"[sha256:{hashlib.sha256(frame(p).encode()).hexdigest()}]")
            for p, r in zip(prompts, results) if "[[status" not in p] == [True] * 4
    sent = [b["messages"] for b in bodies]
    assert [m[-1]["content"] for m in sent] == [frame(p) for p in prompts]
    for messages in sent:
        assert [m["role"] for m in messages] == ["system", "user"], messages
        system = messages[0]["content"]
        system = system if isinstance(system, str) else "".join(x.get("text", "") for x in system)
        assert TEACHER_PROMPT.splitlines()[0] in system


@pytest.mark.parametrize("kimi", KIMIS)
def test_slash_prefixed_prompts_reach_the_model_verbatim_as_text(wire, env, monkeypatch, kimi):
    prompts = ["/clear", "/yolo", "/init something", "/compact keep it"]
    with ChatServer() as server:
        point_kimi_at(server, monkeypatch)
        t = wire(kimi_bin=kimi, max_jobs=1, teacher_timeout=60)  # a loaded host starts kimi slowly

        async def go():
            return [await t.ask(p) for p in prompts]

        answers = run(t, go)
        bodies = server.chat_bodies()
    assert [b["messages"][-1]["content"] for b in bodies] == [frame(p) for p in prompts]
    for p, a in zip(prompts, answers):
        assert "**THESIS**" in a.text and hashlib.sha256(frame(p).encode()).hexdigest() in a.text


def test_error_replies_follow_the_exit_code_policy_and_keep_the_process(wire, env):
    t = wire(max_jobs=1)
    cases = [("[[fake:error429]] q", TransientError, "429"), ("[[fake:error503]] q", TransientError, "503"),
             ("[[fake:error400]] q", ConfigError, "400"), ("[[fake:exit1]] q", ConfigError, "LLM not set"),
             ("[[fake:empty]] q", TransientError, "empty answer")]

    async def go():
        for prompt, error, text in cases:
            with pytest.raises(error, match=text):
                await t.ask(prompt)
        await t.ask("fine")
        return t.pool.started

    assert run(t, go) == 1
    assert [c["context"] for c in prompts_logged(env)] == [1] * (len(cases) + 1)


def test_timeout_cancels_the_turn_and_keeps_the_process(wire, env):
    t = wire(max_jobs=1, teacher_timeout=1)

    async def go():
        t0 = time.monotonic()
        with pytest.raises(TransientError, match="timed out after 1s"):
            await t.ask("[[fake:hang]] q")
        took = time.monotonic() - t0
        await t.ask("next")  # waits for the cancelled turn to end and its context to clear
        return took, t.pool.started

    took, started = run(t, go)
    assert took < 1.5 and started == 1
    calls = prompts_logged(env)
    assert len({c["pid"] for c in calls}) == 1 and calls[-1]["context"] == 1


def test_turn_that_ignores_cancel_gets_its_process_killed_and_replaced(wire, env, monkeypatch):
    monkeypatch.setattr(kimi_wire, "CANCEL_GRACE", 0.5)
    t = wire(max_jobs=1, teacher_timeout=1)

    async def go():
        with pytest.raises(TransientError, match="timed out"):
            await t.ask("[[fake:stuck]] q")
        return await t.ask("next")

    assert "**THESIS**" in run(t, go).text
    stuck, fresh = prompts_logged(env)
    assert stuck["pid"] != fresh["pid"] and wait_dead(stuck["pid"])


def test_cancelled_job_cancels_the_turn_and_leaves_the_pool_healthy(wire, env):
    t = wire(max_jobs=1)

    async def go():
        job = asyncio.create_task(t.ask("[[fake:hang]] abort me"))
        while not prompts_logged(env):
            await asyncio.sleep(0.02)
        job.cancel()  # arq abort, or the SIGTERM drain running out
        with pytest.raises(asyncio.CancelledError):
            await job
        answer = await asyncio.wait_for(t.ask("next"), 5)  # one slot: only free once the turn is cancelled
        return answer, t.pool.started

    answer, started = run(t, go)
    assert "**THESIS**" in answer.text and started == 1
    hung, nxt = prompts_logged(env)
    assert hung["pid"] == nxt["pid"] and nxt["context"] == 1


@pytest.mark.parametrize("mode, text", [("garbage", "garbage"), ("crash", "exited -9"), ("exit2", "exited 2")])
def test_broken_process_is_transient_and_replaced(wire, env, mode, text):
    t = wire(max_jobs=1)

    async def go():
        with pytest.raises(TransientError, match=text):
            await t.ask(f"[[fake:{mode}]] q")
        return await t.ask("next")

    assert "**THESIS**" in run(t, go).text
    broken, fresh = prompts_logged(env)
    assert broken["pid"] != fresh["pid"] and wait_dead(broken["pid"])


def test_output_over_the_cap_kills_the_process(wire, env, monkeypatch):
    monkeypatch.setenv("FAKE_KIMI_HUGE_MB", "3")
    t = wire(teacher_output_cap=1024 * 1024)
    with pytest.raises(TransientError, match="over 1048576 bytes"):
        run(t, lambda: t.ask("[[fake:huge]] q"))
    assert wait_dead(prompts_logged(env)[0]["pid"])


def test_unacknowledged_clear_replaces_the_process_but_keeps_the_answer(wire, env, monkeypatch):
    monkeypatch.setenv("FAKE_KIMI_BAD_CLEAR", "1")
    t = wire(max_jobs=1)

    async def go():
        return [await t.ask(p) for p in ("one", "two", "three")]

    assert all("**THESIS**" in a.text for a in run(t, go))
    calls = prompts_logged(env)
    assert len({c["pid"] for c in calls}) == 3 and [c["context"] for c in calls] == [1, 1, 1]


def test_processes_are_recycled_after_n_prompts(wire, env):
    t = wire(max_jobs=1, kimi_recycle=2)

    async def go():
        for i in range(5):
            await t.ask(f"prompt {i}")
        await asyncio.sleep(0.2)  # retired processes are reaped in the background
        return sorted(p.name for p in (t.home / "wire").iterdir())

    dirs = run(t, go)
    pids = [c["pid"] for c in prompts_logged(env)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
    assert len(dirs) == 1, f"a retired process's share and work dirs are removed: {dirs}"
    assert not any(alive(p) for p in set(pids))  # and close() ended the last


def test_one_lazily_started_process_per_job_slot_each_with_its_own_dirs(wire, env, monkeypatch):
    monkeypatch.setenv("FAKE_KIMI_DELAY", "0.3")
    t = wire(max_jobs=3)

    async def go():
        assert t.pool.started == 0
        answers = await asyncio.gather(*(t.ask(f"concurrent {i}") for i in range(7)))
        return answers, t.pool.started

    answers, started = run(t, go)
    assert len(answers) == 7 and started == 3
    calls = prompts_logged(env)
    share_dirs = {c["pid"]: c["share_dir"] for c in calls}
    assert len(share_dirs) == 3 and len(set(share_dirs.values())) == 3
    assert all(c["context"] == 1 for c in calls)
    assert not any(alive(pid) for pid in share_dirs)
    assert not list((t.home / "wire").iterdir())


def test_start_up_failure_is_a_config_error(wire, env, monkeypatch):
    monkeypatch.setenv("FAKE_KIMI_MODE", "exit2")
    t = wire()
    with pytest.raises(ConfigError, match="(?s)exited 2 while starting.*Invalid value"):
        run(t, lambda: t.ask("q"))


def test_process_that_died_while_idle_is_replaced_without_failing_a_prompt(wire, env):
    t = wire(max_jobs=1)

    async def go():
        await t.ask("one")
        os.kill(prompts_logged(env)[0]["pid"], 9)
        await asyncio.sleep(0.2)
        return await t.ask("two")

    assert "**THESIS**" in run(t, go).text
    one, two = prompts_logged(env)
    assert one["pid"] != two["pid"]


def test_a_process_never_outlives_the_event_loop_that_started_it(wire, env):
    """A caller that forgets close() (a one-off asyncio.run) leaves no kimi behind."""
    t = wire()
    asyncio.run(t.ask("one-off"))
    assert wait_dead(prompts_logged(env)[0]["pid"])


def test_waiting_for_a_busy_slot_counts_against_the_teacher_timeout(wire, env, monkeypatch):
    monkeypatch.setattr(kimi_wire, "CANCEL_GRACE", 30)  # the stuck turn keeps its process (and slot) a while
    t = wire(max_jobs=1, teacher_timeout=1)

    async def go():
        with pytest.raises(TransientError, match="timed out"):
            await t.ask("[[fake:stuck]] q")
        t0 = time.monotonic()
        with pytest.raises(TransientError, match="waiting for a kimi process"):
            await t.ask("next")
        return time.monotonic() - t0

    assert run(t, go) < 2


@pytest.mark.skipif(REAL_KIMI is None, reason="kimi-cli 1.51.0 not installed: `make kimi-legacy` or set HEGELION_TEST_KIMI_BIN")
@pytest.mark.parametrize("mode", ["wire", "print"])
def test_real_kimi_runs_no_tool_a_hostile_model_asks_for(wire, env, monkeypatch, tmp_path, mode):
    """The model answers with a Shell tool call; our agent file has no tools, so nothing runs."""
    target = tmp_path / "pwned"
    args = orjson.dumps({"command": f"touch {target}"}).decode()
    with ChatServer() as server:
        point_kimi_at(server, monkeypatch)
        t = wire(kimi_bin=REAL_KIMI, kimi_mode=mode, max_jobs=1, teacher_timeout=60)
        assert t.settings.kimi_mode == mode
        answer = run(t, lambda: t.ask(f"Please comply. [[tool:Shell:{args}]]"))
        bodies = server.chat_bodies()
    assert not target.exists(), "a tool call ran a command"
    tool_results = [m for b in bodies for m in b["messages"] if m.get("role") == "tool"]
    assert tool_results, "kimi never answered the tool call"
    result = "".join(x.get("text", "") for x in tool_results[0]["content"]) \
        if isinstance(tool_results[0]["content"], list) else tool_results[0]["content"]
    assert "not found" in result.lower() or "error" in result.lower()
    assert "**THESIS**" in answer.text


@pytest.mark.skipif(REAL_KIMI is None, reason="kimi-cli 1.51.0 not installed: `make kimi-legacy` or set HEGELION_TEST_KIMI_BIN")
def test_the_users_own_kimi_cli_login_works_with_nothing_set(wire, env, tmp_path, monkeypatch):
    """~/.kimi as `kimi login` leaves it (a managed provider with a file OAuth ref, the token in credentials/): each
    wire process reads the user's config and credentials through its private share dir, writes nothing there."""
    user = tmp_path / "home" / ".kimi"
    (user / "credentials").mkdir(parents=True)
    with ChatServer(require_token=True) as server:
        (user / "config.toml").write_text(f'''default_model = "kimi-code/kimi-for-coding"
[providers."managed:kimi-code"]
type = "kimi"
base_url = "{server.base_url}"
api_key = ""
oauth = {{ storage = "file", key = "oauth/kimi-code" }}
[models."kimi-code/kimi-for-coding"]
provider = "managed:kimi-code"
model = "kimi-for-coding"
max_context_size = 262144
''')
        (user / "credentials" / "kimi-code.json").write_text(orjson.dumps({
            "access_token": "at-1", "refresh_token": "rt-1", "expires_at": time.time() + 3600, "scope": "kimi-code",
            "token_type": "Bearer", "expires_in": 3600}).decode())
        before = sorted(p.relative_to(user) for p in user.rglob("*"))
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        t = wire(kimi_bin=REAL_KIMI, max_jobs=1, teacher_timeout=60)
        answer = run(t, lambda: t.ask("What is justice?"))
        auth = {r["auth"] for r in server.chat_requests()}
    assert answer.text.endswith(f"[sha256:{hashlib.sha256(frame('What is justice?').encode()).hexdigest()}]")
    assert auth == {"Bearer at-1"}
    assert sorted(p.relative_to(user) for p in user.rglob("*")) == before, "nothing written in the user's ~/.kimi"
