"""The benchmark harness keeps working (smoke sizes; targets are read from the full run, not here)."""

import subprocess
import sys

import orjson
import pytest

from .conftest import ROOT

pytestmark = pytest.mark.e2e


def test_bench_smoke_runs_every_figure():
    p = subprocess.run([sys.executable, "-m", "bench.run", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = orjson.loads((ROOT / "artifacts" / "bench" / "smoke.json").read_bytes())
    names = " ".join(f["name"] for f in result["figures"])
    for word in ("enqueue", "RSS", "pipeline", "overhead", "old way", "memory", "trainer", "/metrics scrape",
                 "/ render", "dashboard: server peak RSS", "export --format hf", "decontaminate"):
        assert word in names
    assert all(f["values"] and f["values"][0] > 0 for f in result["figures"] if "skipped" not in f["name"])
    assert result["machine"]["cores"] and result["machine"]["versions"]["arq"]
