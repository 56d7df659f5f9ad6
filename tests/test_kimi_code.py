"""The real Kimi Code CLI (`make kimi`) as the teacher, against the local OpenAI-compatible server: what each request
carries, what a tool call does, the user's own login, a SIGKILLed ACP process and 200 prompts exactly once with real
workers. Skipped, saying how to install it, where Kimi Code is not installed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from hegelion_queue.dialectic import TEACHER_PROMPT, frame
from hegelion_queue.teacher.presets import ConfigError, Teacher, TransientError

from .conftest import FIXTURES, make_teacher
from .openai_server import ChatServer
from .real_kimi import real_kimi_code
from .test_generator_e2e import assert_exactly_once, parent_of, wait_finished, workers  # noqa: F401

KIMI_CODE = real_kimi_code()
pytestmark = pytest.mark.skipif(
    KIMI_CODE is None, reason="Kimi Code CLI not installed: `make kimi` or set HEGELION_TEST_KIMI_CODE_BIN")


@pytest.fixture
def kimi_code(env, tmp_path, monkeypatch):
    """A Teacher running the real Kimi Code; `server` given: its endpoint in KIMI_BASE_URL / KIMI_API_KEY /
    KIMI_MODEL_NAME, else none (the user's login in HOME, if the test wrote one)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def make(server: ChatServer | None = None, **overrides) -> Teacher:
        if server is not None:
            monkeypatch.setenv("KIMI_BASE_URL", server.base_url)
            monkeypatch.setenv("KIMI_API_KEY", "test-key")
            monkeypatch.setenv("KIMI_MODEL_NAME", "test-model")
        overrides = {"kimi_bin": KIMI_CODE, "teacher_timeout": 60, **overrides}
        return make_teacher(monkeypatch, tmp_path / "teacher", **overrides)

    return make


def ask_each(t: Teacher, prompts: list[str], concurrent: bool = True) -> list:
    async def go():
        try:
            if concurrent:
                return await asyncio.gather(*(t.ask(p) for p in prompts), return_exceptions=True)
            out = []
            for p in prompts:
                try:
                    out.append(await t.ask(p))
                except Exception as e:  # noqa: BLE001 -- the test looks at which
                    out.append(e)
            return out
        finally:
            await t.close()

    return asyncio.run(go())


def tagged(prompt: str) -> str:
    return f"[sha256:{hashlib.sha256(frame(prompt).encode()).hexdigest()}]"


def test_every_request_carries_our_instructions_and_the_prompt_only(kimi_code):
    """Context isolation and a teacher, not an agent: one system message (ours, verbatim), one user message (the
    prompt), no tools, no reminders — and provider errors mapped as for the wire pool, fast (one attempt)."""
    prompts = ["What is justice?", "Is tea better than coffee?", "Should cities ban cars?"]
    errors = ["[[status:400]] a rejected request", "[[status:429]] rate limited", "[[status:401]] bad key"]
    with ChatServer() as server:
        t = kimi_code(server, max_jobs=8)
        t0 = time.monotonic()
        results = ask_each(t, prompts + errors)
        took = time.monotonic() - t0
        requests = server.chat_requests()
    assert t.protocol == "acp"
    for p, r in zip(prompts, results):
        assert not isinstance(r, Exception), r
        assert r.text.endswith(tagged(p))
        assert r.usage == {"input_other": 50, "output": 40, "input_cache_read": 0, "input_cache_creation": 0}
    bad, limited, unauthorized = results[3:]
    assert isinstance(bad, ConfigError) and "400" in str(bad)
    assert isinstance(limited, TransientError) and "429" in str(limited)
    assert isinstance(unauthorized, ConfigError) and "401" in str(unauthorized)
    assert took < 30, "kimi's own ~140 s of retries are off: the job's policy retries"
    assert len(requests) == len(prompts) + len(errors), "one request per prompt"
    for req in requests:
        body = req["body"]
        assert [m["role"] for m in body["messages"]] == ["system", "user"], body["messages"]
        assert body["messages"][0]["content"] == TEACHER_PROMPT
        user = body["messages"][1]["content"]
        user = user if isinstance(user, str) else "".join(p.get("text", "") for p in user)
        assert user in [frame(p) for p in prompts + errors]
        assert "tools" not in body or not body["tools"]


def test_a_tool_calling_model_runs_nothing(kimi_code, tmp_path):
    targets = [tmp_path / "pwned-bash", tmp_path / "pwned-write"]
    prompts = [f'[[tool:Bash:{json.dumps({"command": f"touch {targets[0]}"})}]] go',
               f'[[tool:Write:{json.dumps({"path": str(targets[1]), "content": "x"})}]] go']
    with ChatServer() as server:
        results = ask_each(kimi_code(server), prompts)
        bodies = [r["body"] for r in server.chat_requests()]
    assert all("**THESIS**" in r.text for r in results), results
    assert not any(p.exists() for p in targets)
    tool_results = [m for b in bodies for m in b["messages"] if m.get("role") == "tool"]
    assert len(tool_results) == 2 and all("disabled" in json.dumps(m) for m in tool_results)


def test_a_deadline_cancels_the_session_and_the_process_answers_on(kimi_code):
    with ChatServer() as server:
        t = kimi_code(server, teacher_timeout=15)

        async def go():
            try:
                await t.ask("warm up")  # the process's start (~3 s) is not part of what is measured
                t0 = time.monotonic()
                with pytest.raises(TransientError, match="timed out after 15s"):
                    await t.ask("[[sleep:60]] a slow provider")
                took = time.monotonic() - t0
                return took, await t.ask("next"), t.pool.started
            finally:
                await t.close()

        took, after, started = asyncio.run(go())
    assert took < 17 and after.text.endswith(tagged("next")) and started == 1


def kimi_login(home: Path, server: ChatServer, expires_in: float) -> Path:
    """~/.kimi-code as `kimi login` leaves it (measured: a managed provider of type kimi with a file OAuth ref) for a
    Kimi account whose OAuth host and API are the local server, the token at-1 / rt-1 issued by it. A login to a
    host other than auth.kimi.com is kept in a slot named by a hash of the host and the API URL (as Kimi Code
    derives it)."""
    user = home / ".kimi-code"
    (user / "credentials").mkdir(parents=True, mode=0o700)
    where = json.dumps({"oauthHost": server.url, "baseUrl": server.base_url}, separators=(",", ":"))
    slot = "kimi-code-env-" + hashlib.sha256(where.encode()).hexdigest()[:16]
    (user / "config.toml").write_text(f'''default_model = "kimi-code/kimi-test"
[providers."managed:kimi-code"]
type = "kimi"
api_key = ""
base_url = "{server.base_url}"
[providers."managed:kimi-code".oauth]
storage = "file"
key = "oauth/{slot}"
oauth_host = "{server.url}"
[models."kimi-code/kimi-test"]
provider = "managed:kimi-code"
model = "kimi-test"
max_context_size = 100000
''')
    (user / "credentials" / f"{slot}.json").write_text(json.dumps({
        "access_token": "at-1", "refresh_token": "rt-1", "expires_at": time.time() + expires_in,
        "scope": "kimi-code", "token_type": "Bearer", "expires_in": 3600}))
    return user


def test_the_users_own_login_works_with_nothing_set(kimi_code, tmp_path):
    with ChatServer(require_token=True) as server:
        user = kimi_login(tmp_path / "home", server, expires_in=3600)
        results = ask_each(kimi_code(), ["What is justice?"])
        auth = {r["auth"] for r in server.chat_requests()}
    assert results[0].text.endswith(tagged("What is justice?"))
    assert auth == {"Bearer at-1"}
    assert not (user / "sessions").exists(), "sessions stay in the process's private home"


def test_a_token_refreshed_by_one_process_does_not_break_the_others(kimi_code, tmp_path):
    """Two processes, a token due for refresh, a server that accepts only the newest tokens: every refresh happens
    once under kimi's own lock in the user's folder, and every prompt is answered."""
    with ChatServer(require_token=True, token_lifetime=3600) as server:
        user = kimi_login(tmp_path / "home", server, expires_in=60)  # inside kimi's refresh window
        prompts = [f"Question {i}?" for i in range(6)]
        results = ask_each(kimi_code(max_jobs=2, acp_processes=2, acp_sessions=1), prompts)
        newest = server.tokens
    assert [r.text.endswith(tagged(p)) for p, r in zip(prompts, results)] == [True] * 6, results
    assert newest > 1, "the token was refreshed"
    saved = json.loads(next((user / "credentials").glob("*.json")).read_text())
    assert saved["refresh_token"] == f"rt-{newest}", "the user's own kimi keeps working too"


def kimi_processes(worker_pid: int) -> list[int]:
    """The worker's Kimi Code processes: node processes it started (found by parentage and /proc/PID/exe, not by
    name: Kimi Code renames itself)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            pid = int(entry)
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                continue
            if os.path.basename(exe) == "node" and parent_of(pid) == worker_pid:
                out.append(pid)
    return out


@pytest.mark.e2e
def test_e2e_200_prompts_through_kimi_code_exactly_once_through_a_sigkill(hq, workers, redis_server, env,  # noqa: F811
                                                                           tmp_path, monkeypatch):
    with ChatServer() as server:
        for k, v in {"KIMI_BASE_URL": server.base_url, "KIMI_API_KEY": "k", "KIMI_MODEL_NAME": "m"}.items():
            monkeypatch.setenv(k, v)
        server.delay = 1.0  # a round of 64 sessions takes a second: the kill lands with sessions in flight
        hq("enqueue", "--prompts-file", str(FIXTURES / "demo_prompts.txt"), "--limit", "200", "--run", "code")
        group = workers(2, HEGELION_KIMI_BIN=KIMI_CODE, HEGELION_MAX_JOBS="32", HEGELION_TEACHER_TIMEOUT="60",
                        HOME=str(tmp_path / "home"))
        r = redis_server.client()
        most, killed = 0, None
        deadline = time.monotonic() + 120
        while not r.exists("hegelion:run:code:finished") and time.monotonic() < deadline:
            counts = [kimi_processes(p.pid) for p in group.procs]
            most = max([most, *map(len, counts)])
            if killed is None and r.scard("hegelion:run:code:done") >= 1 and counts[0]:
                killed = counts[0][0]
                os.kill(killed, signal.SIGKILL)  # the ACP process, mid-run, with sessions in flight
            time.sleep(0.1)
        wait_finished(r, "code", timeout=5)
    assert killed is not None
    assert 1 <= most <= 2, f"{most} kimi processes in one worker"
    assert r.hlen("hegelion:run:code:dead") == 0
    assert int(r.hget("hegelion:run:code:stats", "retries") or 0) > 0, "the kill failed prompts in flight"
    hq("export", "--run", "code")
    assert_exactly_once(Path(env["HEGELION_DATA_DIR"]) / "code.jsonl", 200)
