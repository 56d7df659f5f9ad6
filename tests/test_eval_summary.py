"""The eval's one line (eval_summary.py) and what showing it costs: `status` must not load MLX, the trainer or
OpenBLAS to print a training's eval, and the package's modules import no circle (train.py ↔ evaluate.py did)."""

from __future__ import annotations

import json
import subprocess
import sys

from hegelion_queue.training.eval_summary import summary_line

from .conftest import ROOT

REPORT = {
    "prompts": 30, "ce_ratio": 0.04,
    "base": {"ce_nats": 6.62, "format_ok": 0, "ce_ci95": [6.5, 6.7], "format_ci95": [0.0, 0.114]},
    "adapter": {"ce_nats": 0.266, "format_ok": 26, "generalisation_gap": 0.063, "ce_ci95": [0.25, 0.281],
                "format_ci95": [0.703, 0.947]},
    "baselines": {"plain": {"ce_nats": 0.265, "format_ok": 26, "generalisation_gap": 0.063, "ce_ci95": [0.249, 0.28],
                            "versus": {"ce_ratio": 1.004, "ce_diff_ci95": [-0.002, 0.004]}}},
}


def test_summary_line_shows_the_intervals():
    line = summary_line(REPORT)
    assert line.startswith("held-out CE 6.620 -> 0.266 nats [0.250, 0.281] (0.04x base)")
    assert "format 0/30 -> 26/30 [70%, 95%]" in line
    assert "plain: CE 0.265 [0.249, 0.280], format 26/30, gap +0.063 vs +0.063, CE ours − plain [-0.002, +0.004]" in line
    old = {k: v for k, v in REPORT.items() if k != "baselines"}  # an eval.json written before the intervals
    old["adapter"] = {k: v for k, v in REPORT["adapter"].items() if "ci95" not in k}
    assert summary_line(old) == "held-out CE 6.620 -> 0.266 nats (0.04x base), format 0/30 -> 26/30"


STATUS_WITH_EVAL = """
import json, sys
from hegelion_queue import cli
from hegelion_queue.queue import status  # the CLI module too: its --help texts must not pull in the trainer
d = {"run": "r", "done": 3, "dead": 0, "pending": 0, "enqueued": 3, "finished": True, "retries": 0,
     "queue": {"name": "q", "total": 0, "due": 0, "deferred": 0}, "samples_per_min_5m": 0, "samples_per_min_60m": 0,
     "eta_s": None, "teacher_seconds": 1, "per_sample": {"teacher_seconds": 0.3}, "usage": {}, "dead_by_reason": {},
     "budget": {}, "paused": None, "workers": [], "in_progress": 0, "health_check": None, "output": "",
     "training": {"state": "done", "eval": json.loads(sys.argv[1])}}
text = status.render(d)
maps = open("/proc/self/maps").read()
print(json.dumps({"line": text.splitlines()[-1], "modules": sorted(m for m in sys.modules if m == "mlx" or
      m.startswith(("mlx.", "mlx_lm", "hegelion_queue"))), "openblas": "openblas" in maps}))
"""


def test_status_and_the_cli_show_an_eval_without_loading_mlx_the_trainer_or_openblas():
    p = subprocess.run([sys.executable, "-c", STATUS_WITH_EVAL, json.dumps(REPORT)], capture_output=True, text=True,
                       cwd=ROOT, timeout=60, check=True)
    got = json.loads(p.stdout)
    assert got["line"] == f"eval: {summary_line(REPORT)}"
    assert not [m for m in got["modules"] if m == "mlx" or m.startswith(("mlx.", "mlx_lm"))], got["modules"]
    for heavy in ("hegelion_queue.training.train", "hegelion_queue.training.evaluate", "hegelion_queue.training.lm",
                  "hegelion_queue.training.blas"):
        assert heavy not in got["modules"], got["modules"]
    assert not got["openblas"]


def test_the_trainer_calls_the_eval_and_not_the_other_way():
    from .test_layers import tree

    graph = tree("hegelion_queue")
    assert "hegelion_queue.training.evaluate" in graph["hegelion_queue.training.train"]
    assert "hegelion_queue.training.train" not in graph["hegelion_queue.training.evaluate"]
