"""Which kimi is installed and how its processes are set up (kimi_setup.py): the version probe, the private homes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hegelion_queue.teacher import kimi as kimi_setup

from .conftest import FAKE_KIMI, ROOT

FAKE_ACP = ROOT / "tests" / "fake_acp.py"


def dead(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_dead(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not dead(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return dead(pid)


def slow_kimi(tmp_path: Path) -> tuple[Path, Path]:
    """A kimi whose --version never answers; it writes its pid first."""
    pid_file = tmp_path / "probe.pid"
    script = tmp_path / "slow-kimi"
    script.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 600\n")
    script.chmod(0o755)
    return script, pid_file


def test_version_tells_kimi_code_from_kimi_cli():
    assert kimi_setup.kimi_version(str(FAKE_ACP)) == "2.1.0"
    assert kimi_setup.major(kimi_setup.kimi_version(str(FAKE_ACP))) == 2
    assert kimi_setup.major(kimi_setup.kimi_version(str(FAKE_KIMI))) == 1
    assert kimi_setup.kimi_version("/nonexistent/kimi").startswith("unavailable (FileNotFoundError")
    assert kimi_setup.major("unavailable (x)") is None


def test_a_version_probe_that_hangs_is_bounded_and_killed(tmp_path, monkeypatch):
    monkeypatch.setattr(kimi_setup, "VERSION_TIMEOUT", 1.0)
    script, pid_file = slow_kimi(tmp_path)
    t0 = time.monotonic()
    assert kimi_setup.kimi_version(str(script)) == f"unavailable ({script} --version did not answer in 1s)"
    assert time.monotonic() - t0 < 3
    assert wait_dead(int(pid_file.read_text()))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_version_probe_dies_with_the_command_that_started_it(tmp_path, sig):
    """SIGTERM (as to `hegelion-queue run` while it enqueues) or SIGKILL of the command: no orphan probe."""
    script, pid_file = slow_kimi(tmp_path)
    code = f"from hegelion_queue.teacher import kimi; kimi.kimi_version({str(script)!r})"
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    probe = int(pid_file.read_text())
    parent.send_signal(sig)
    parent.wait(10)
    assert wait_dead(probe), "the probe outlived its parent"


def test_kimi_cli_share_dir_links_the_users_login_and_copies_nothing(tmp_path):
    user = tmp_path / ".kimi"
    (user / "credentials").mkdir(parents=True)
    (user / "config.toml").write_text('default_model = "m"\n')
    (user / "device_id").write_text("abc")
    share = tmp_path / "private" / "share"
    argv = kimi_setup.kimi_cli_share(share, {"KIMI_SHARE_DIR": str(user)}, "")
    assert argv == ["--config-file", str(user / "config.toml")]
    assert (share / "credentials").resolve() == user / "credentials" and (share / "credentials").is_symlink()
    assert (share / "device_id").is_symlink()
    assert kimi_setup.kimi_cli_model({"KIMI_SHARE_DIR": str(user)}) == "m"
    # an endpoint wins over the login; an explicit config file over both
    assert kimi_setup.kimi_cli_share(tmp_path / "p2", {"KIMI_SHARE_DIR": str(user), "KIMI_BASE_URL": "http://x"},
                                     "") == []
    assert kimi_setup.kimi_cli_share(tmp_path / "p3", {}, "/etc/kimi.toml") == ["--config-file", "/etc/kimi.toml"]


def test_kimi_code_home_from_an_endpoint_is_private_and_complete(tmp_path):
    import tomllib

    env = {"KIMI_BASE_URL": "http://127.0.0.1:9/v1", "KIMI_API_KEY": 'se"cret', "KIMI_MODEL_NAME": "kimi-k2",
           "KIMI_MODEL_TEMPERATURE": "2", "NODE_OPTIONS": "--trace-warnings", "HOME": str(tmp_path)}
    home = kimi_setup.kimi_code_home(tmp_path / "h", env)
    config = tomllib.loads((home / "config.toml").read_text())
    assert config["default_model"] == "teacher"
    assert config["providers"]["endpoint"] == {"type": "openai", "base_url": env["KIMI_BASE_URL"], "api_key": 'se"cret'}
    assert config["models"]["teacher"]["model"] == "kimi-k2" and config["models"]["teacher"]["max_context_size"] > 0
    assert oct((home / "config.toml").stat().st_mode)[-3:] == "600"
    child = kimi_setup.kimi_code_env(home, env)
    assert child["KIMI_CODE_HOME"] == str(home) and child["KIMI_LOOP_MAX_ATTEMPTS_PER_STEP"] == "1"
    assert child["NODE_OPTIONS"] == f"--trace-warnings --max-old-space-size={kimi_setup.NODE_HEAP_MB}"
    assert "KIMI_MODEL_TEMPERATURE" not in child  # KIMI_MODEL_* would override the private config
    assert not (tmp_path / ".kimi-code").exists()
    assert kimi_setup.kimi_code_session_cwd(tmp_path / "work").endswith("/work/")
