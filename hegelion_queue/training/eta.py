"""How long the training will take, measured on this machine after its first few steps. Pure.

The first step compiles the training graph (and mlx-lm validates before it): the next MEASURED_STEPS are timed, and
the estimate is their time per step × the steps left, plus the validations still to come at the time the first one
took, plus any further training of the same length (the plain twin of `--baseline plain`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

WARMUP_STEPS = 1
MEASURED_STEPS = 4
MANY_HOURS = 3 * 3600


@dataclass
class Estimate:
    step: int  # steps done when it was measured
    iters: int
    s_per_step: float
    val_s: float  # one validation
    val_left: int  # validations still to come in this training
    val_total: int  # validations of a whole training
    runs: int = 1  # trainings still to come, this one included (2 with the plain twin)
    device: str = "cpu"

    @property
    def remaining_s(self) -> float:
        this = (self.iters - self.step) * self.s_per_step + self.val_left * self.val_s
        return this + (self.runs - 1) * (self.iters * self.s_per_step + self.val_total * self.val_s)

    def as_dict(self) -> dict:
        return {**asdict(self), "remaining_s": round(self.remaining_s, 1)}


def duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 86400:
        return f"{s / 86400:.1f} days"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def lines(est: Estimate) -> list[str]:
    """What `train` and `make run` print: the measured estimate, and when it is many hours on a CPU, the ways out."""
    twin = " and the plain twin" if est.runs > 1 else ""
    out = [f"expected training time: about {duration(est.remaining_s)} more ({est.s_per_step:.3g} s/step measured "
           f"on {est.device} over steps {est.step - MEASURED_STEPS + 1}-{est.step}; {est.iters - est.step} of "
           f"{est.iters} steps left{twin})"]
    if est.device == "cpu" and est.remaining_s > MANY_HOURS:
        out.append("that is many hours on a CPU: a smaller model (HEGELION_TRAIN_MODEL), fewer steps (--iters), a Mac "
                   "with Apple Silicon (MLX on Metal) or an NVIDIA GPU (make setup installs mlx[cuda12|cuda13] when "
                   "nvidia-smi lists one) is far faster")
    return out


class StepClock:
    """Fed by the trainer's callback after every step (and every validation); says when the estimate is ready."""

    def __init__(self, step0: int, iters: int, steps_per_eval: int, validates: bool, runs: int = 1,
                 device: str = "cpu", clock=time.perf_counter):
        self.step0, self.iters, self.every, self.validates = step0, iters, steps_per_eval, validates
        self.runs, self.device, self.clock = runs, device, clock
        self.val_s: float | None = None  # the first validation's time
        self._val_since = 0.0  # validation time since the clock started (not a step's)
        self._start: float | None = None
        self.done = False

    def validated(self, seconds: float) -> None:
        if self.val_s is None:
            self.val_s = seconds
        if self._start is not None:
            self._val_since += seconds

    def _vals(self, after: int) -> int:
        """Validations mlx-lm runs in this segment before iterations after+1 … n (and before the last)."""
        n = self.iters - self.step0
        if not self.validates:
            return 0
        return sum(1 for it in range(after + 1, n + 1) if it % self.every == 0 or it == n)

    def stepped(self, step: int) -> Estimate | None:
        """Call after each step (global numbering); returns the estimate once, after the measured steps."""
        it = step - self.step0
        if self.done or self.iters - self.step0 <= WARMUP_STEPS + MEASURED_STEPS:
            return None
        if it == WARMUP_STEPS:
            self._start, self._val_since = self.clock(), 0.0
            return None
        if it < WARMUP_STEPS + MEASURED_STEPS or self._start is None:
            return None
        self.done = True
        per_step = (self.clock() - self._start - self._val_since) / MEASURED_STEPS
        return Estimate(step, self.iters, per_step, self.val_s or 0.0, self._vals(it), self._vals(0) + (
            1 if self.validates else 0), self.runs, self.device)
