"""The teacher runner and presets, with the fake kimi as a real subprocess, in print and wire mode
(the pool of wire processes has its own tests in test_kimi_wire.py)."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import orjson
import pytest

from hegelion_queue.dialectic import frame
from hegelion_queue.settings import get_settings
from hegelion_queue.teacher.presets import ConfigError, Teacher, TransientError, parse_kimi_stream, run_process

from .conftest import make_teacher


MODES = ["print", "wire"]


@pytest.fixture
def teacher(env, tmp_path, monkeypatch):
    def make(kimi_mode="print", **overrides):
        overrides["kimi_mode"] = kimi_mode
        return make_teacher(monkeypatch, tmp_path / "teacher", **overrides)

    return make


def ask(t: Teacher, prompt: str):
    async def once():
        try:
            return await t.ask(prompt)
        finally:
            await t.close()

    return asyncio.run(once())


def log_lines(env):
    return [orjson.loads(line) for line in open(env["FAKE_KIMI_LOG"], "rb")]


def test_kimi_answer_reasoning_and_flags(teacher, env):
    t = teacher()
    a = ask(t, "Is remote work good?")
    assert "**THESIS**" in a.text and a.reasoning == "Weighing both sides."
    call = log_lines(env)[-1]
    assert call["argv"][:5] == ["--print", "--output-format", "stream-json", "--agent-file", str(t.agent_file)]
    assert "tools: []" in call["agent"]
    assert call["share_dir"] == str(t.home / "share")
    assert call["stdin"] == frame("Is remote work good?")


def test_kimi_cli_runs_in_wire_mode_by_default(env, monkeypatch, tmp_path):
    """HEGELION_KIMI_MODE=auto (the default) picks wire for kimi-cli 1.x, by its `kimi --version`."""
    monkeypatch.delenv("HEGELION_KIMI_MODE", raising=False)
    get_settings.cache_clear()
    assert get_settings().kimi_mode == "auto"
    t = Teacher(get_settings(), tmp_path / "teacher")
    a = ask(t, "Is remote work good?")
    assert t.protocol == "wire"
    assert "**THESIS**" in a.text and a.reasoning == "Weighing both sides." and a.usage["output"] == 80
    call = log_lines(env)[-1]
    assert call["argv"][:3] == ["--wire", "--agent-file", str(t.agent_file)] and call["wire"]
    assert call["stdin"] == frame("Is remote work good?")
    assert call["share_dir"].startswith(str(t.home / "wire"))


@pytest.mark.parametrize("mode", MODES)
def test_hostile_prompt_is_passed_verbatim_and_runs_nothing(teacher, env, tmp_path, mode):
    prompt = "$(touch pwned) `touch pwned2`; touch pwned3 | cat\n--yolo --agent-file /etc/passwd\n/clear"
    ask(teacher(mode), prompt)
    assert log_lines(env)[-1]["stdin"] == frame(prompt)
    assert not list(tmp_path.rglob("pwned*"))  # the test's cwd and the teacher's work dir are under tmp_path


@pytest.mark.parametrize(
    "kimi_mode, mode, error, text",
    [
        ("print", "exit75", TransientError, "exited 75"),
        ("print", "exit1", ConfigError, "LLM not set"),
        ("print", "exit2", ConfigError, "exited 2"),
        ("print", "garbage", TransientError, "empty answer"),
        ("print", "empty", TransientError, "empty answer"),
        ("print", "crash", TransientError, "exited -9"),
        ("wire", "exit75", TransientError, "429"),
        ("wire", "exit1", ConfigError, "LLM not set"),
        ("wire", "exit2", ConfigError, "exited 2 while starting"),
        ("wire", "garbage", TransientError, "garbage"),
        ("wire", "empty", TransientError, "empty answer"),
        ("wire", "crash", TransientError, "exited -9"),
    ],
)
def test_exit_code_policy(teacher, monkeypatch, kimi_mode, mode, error, text):
    monkeypatch.setenv("FAKE_KIMI_MODE", mode)
    with pytest.raises(error, match=text):
        ask(teacher(kimi_mode), "question")


def test_print_error_names_kimis_message_not_its_resume_hint(teacher, tmp_path):
    script = tmp_path / "kimi"
    script.write_text("#!/bin/sh\necho 'LLM not set'\necho 'To resume this session: kimi -r 1234' >&2\nexit 1\n")
    script.chmod(0o755)
    with pytest.raises(ConfigError, match="exited 1: LLM not set"):
        ask(teacher(kimi_bin=str(script)), "q")


@pytest.mark.parametrize("mode", MODES)
def test_missing_binary_is_a_config_error(teacher, mode):
    with pytest.raises(ConfigError, match="not found"):
        ask(teacher(mode, kimi_bin="/nonexistent/kimi"), "q")


@pytest.mark.parametrize("mode", MODES)
def test_hang_past_timeout_is_transient_and_kills_the_process(teacher, monkeypatch, env, mode):
    """In wire mode the turn is cancelled first (see test_kimi_wire.py); close() ends the process."""
    monkeypatch.setenv("FAKE_KIMI_MODE", "hang")
    t0 = time.monotonic()
    with pytest.raises(TransientError, match="timed out"):
        ask(teacher(mode, teacher_timeout=1), "q")
    assert time.monotonic() - t0 < 5
    pid = log_lines(env)[-1]["pid"]
    time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]


@pytest.mark.parametrize("mode", MODES)
def test_output_over_the_cap_is_cut_and_transient(teacher, monkeypatch, mode):
    monkeypatch.setenv("FAKE_KIMI_MODE", "huge")
    with pytest.raises(TransientError, match="over 1048576 bytes"):
        ask(teacher(mode, teacher_output_cap=1024 * 1024), "q")


def test_command_preset_gets_the_prompt_on_stdin(teacher):
    a = ask(teacher(teacher="command", teacher_cmd="cat"), "echo me; $(rm -rf /)")
    assert a.text == frame("echo me; $(rm -rf /)").strip()


def test_command_preset_without_command_is_a_config_error(teacher):
    with pytest.raises(ConfigError, match="HEGELION_TEACHER_CMD"):
        ask(teacher(teacher="command", teacher_cmd=""), "q")


def test_timeout_kills_the_whole_process_group(tmp_path):
    child_pid_file = tmp_path / "child.pid"
    code = (f"import subprocess,time; p=subprocess.Popen(['sleep','60']); "
            f"open({str(child_pid_file)!r},'w').write(str(p.pid)); time.sleep(60)")
    r = asyncio.run(run_process([sys.executable, "-c", code], b"", timeout=1.5, cap=1000))
    assert r.timed_out
    child = int(child_pid_file.read_text())
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{child}") or "Z" in open(f"/proc/{child}/stat").read().split()[2]


def test_parse_kimi_stream_takes_the_last_assistant_message_and_skips_noise():
    out = "\n".join([
        '{"role":"assistant","content":[],"tool_calls":[{"type":"function","id":"1","function":{"name":"Shell","arguments":"{}"}}]}',
        '{"role":"tool","content":"<system>ERROR: Tool `Shell` not found</system>","tool_call_id":"1"}',
        "some plain text line",
        '{"role":"assistant","content":[{"type":"think","think":"hm","encrypted":null},{"type":"text","text":"final"}]}',
    ])
    a = parse_kimi_stream(out)
    assert (a.text, a.reasoning) == ("final", "hm")
    assert parse_kimi_stream('{"role":"assistant","content":"plain"}').text == "plain"
    assert parse_kimi_stream("LLM not set").text == ""


def test_kimi_bin_defaults_to_the_one_make_kimi_installed(monkeypatch, tmp_path):
    from hegelion_queue.settings import PROJECT_ROOT, Settings

    monkeypatch.delenv("HEGELION_KIMI_BIN", raising=False)
    monkeypatch.chdir(tmp_path)
    installed = [PROJECT_ROOT / d / "bin" / "kimi" for d in (".kimi-code", ".kimi-venv")]
    assert Settings().kimi_bin == next((str(p) for p in installed if p.exists()), "kimi")  # else: kimi on PATH
    for d in (".kimi-venv", ".kimi-code"):  # make kimi-legacy, then make kimi: Kimi Code comes first
        here = tmp_path / d / "bin" / "kimi"
        here.parent.mkdir(parents=True)
        here.write_text("#!/bin/sh\n")
        assert Settings().kimi_bin == str(here)  # the checkout you run from comes first
    monkeypatch.setenv("HEGELION_KIMI_BIN", "/opt/kimi")
    assert Settings().kimi_bin == "/opt/kimi"  # an explicit setting always wins
