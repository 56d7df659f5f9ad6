"""The chaos harness, short form: SIGKILLed workers, lost replies, a paused and a restarted Redis lose and
duplicate nothing, and the finished run has exactly one training job."""

import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("mode", [[], ["--mode", "acp"]], ids=["wire", "acp"])
def test_chaos_short_form_loses_nothing_and_duplicates_nothing(mode):
    p = subprocess.run([sys.executable, "-m", "tests.chaos", "--short", *mode], cwd=ROOT, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "OK: nothing lost, nothing duplicated" in p.stdout
    assert "lost 0, duplicates 0, truncated 0" in p.stdout and "redis restarts 1" in p.stdout
    assert "redis pauses 1" in p.stdout and "training jobs 1" in p.stdout and "lost replies 0" not in p.stdout
    if mode:
        assert "0 of ACP processes" not in p.stdout, "the ACP teachers were killed too"
