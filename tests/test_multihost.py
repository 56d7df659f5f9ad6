"""End to end across hosts: tests/multihost.py in its short (CI) form, in network namespaces of its own.

Skips, saying why, where network namespaces are not permitted (not root, no iproute2, a container without
CAP_SYS_ADMIN). `make multihost` runs the long form (200 prompts)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.e2e


def test_e2e_multihost_short_form():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multihost.py"), "--short", "--timeout", "150"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    print(proc.stdout)
    if proc.returncode == 2:
        pytest.skip(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "network namespaces unavailable")
    assert proc.returncode == 0, f"multihost harness failed:\n{proc.stdout}\n{proc.stderr}"
    assert "PASSED" in proc.stdout
