"""What every benchmark module shares: a figure (its repetitions, target and whether it was met) and the command line
of `hegelion-queue` run as a child process."""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field

HQ = [sys.executable, "-m", "hegelion_queue.cli"]


@dataclass
class Figure:
    name: str
    unit: str
    target: str
    values: list[float] = field(default_factory=list)
    detail: list[dict] = field(default_factory=list)
    met: bool | None = None

    def summary(self) -> dict:
        v = sorted(self.values)
        return {"min": v[0], "median": statistics.median(v), "max": v[-1]} if v else {}
