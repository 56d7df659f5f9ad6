"""eval.json as one line, for `status`, the CLI and logs. Pure: importing it loads neither MLX nor the trainer,
so `status` on a host without the train extra (or before any training) stays light."""

from __future__ import annotations

from typing import Any


def _ci(interval: Any, fmt: str = "{:.3f}") -> str:
    if not (isinstance(interval, (list, tuple)) and len(interval) == 2):
        return ""
    return f" [{fmt.format(interval[0])}, {fmt.format(interval[1])}]"


def _pct(interval: Any) -> str:
    return _ci([100 * v for v in interval] if isinstance(interval, (list, tuple)) else None, "{:.0f}%")


def summary_line(report: dict) -> str:
    """One line: held-out CE base -> adapter (with the adapter's 95 % bootstrap interval), format adherence (with
    its Wilson interval), and each baseline twin."""
    b, a = report["base"], report["adapter"]
    n = report["prompts"]
    line = (f"held-out CE {b['ce_nats']:.3f} -> {a['ce_nats']:.3f} nats{_ci(a.get('ce_ci95'))} "
            f"({report['ce_ratio']:.2f}x base), format {b['format_ok']}/{n} -> {a['format_ok']}/{n}"
            f"{_pct(a.get('format_ci95'))}")
    for name, o in report.get("baselines", {}).items():
        line += f"; {name}: CE {o['ce_nats']:.3f}{_ci(o.get('ce_ci95'))}, format {o['format_ok']}/{n}"
        if o.get("generalisation_gap") is not None and a.get("generalisation_gap") is not None:
            line += f", gap {o['generalisation_gap']:+.3f} vs {a['generalisation_gap']:+.3f}"
        diff = (o.get("versus") or {}).get("ce_diff_ci95")
        if diff:
            line += f", CE ours − {name}{_ci(diff, '{:+.3f}')}"
    return line
