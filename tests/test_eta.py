"""The measured training-time estimate (hegelion_queue/training/eta.py), with a fake clock."""

from __future__ import annotations

import pytest

from hegelion_queue.training.eta import Estimate, StepClock, duration, lines


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_estimate_times_steps_after_the_compiling_one_and_leaves_validations_out():
    t = FakeClock()
    clock = StepClock(step0=0, iters=100, steps_per_eval=20, validates=True, clock=t)
    clock.validated(3.0)  # mlx-lm validates before step 1
    t.now = 30.0  # step 1: compiling
    assert clock.stepped(1) is None
    for step in (2, 3, 4, 5):
        if step == 3:
            t.now += 3.0
            clock.validated(3.0)  # a validation between steps is not a step's time
        t.now += 2.0
        est = clock.stepped(step)
        assert (est is None) == (step < 5)
    assert est.s_per_step == pytest.approx(2.0) and est.step == 5
    # validations still to come: before iterations 20, 40, 60, 80, 100 (the last one's too): 5, at 3 s each
    assert est.val_left == 5 and est.remaining_s == pytest.approx(95 * 2.0 + 5 * 3.0)
    assert clock.stepped(6) is None  # once


def test_a_resumed_training_counts_from_its_checkpoint_and_the_twin_doubles_the_rest():
    t = FakeClock()
    clock = StepClock(step0=40, iters=50, steps_per_eval=1000, validates=False, runs=2, clock=t)
    for step in range(41, 46):
        t.now += 1.0
        est = clock.stepped(step)
    assert est.step == 45 and est.val_left == 0
    assert est.remaining_s == pytest.approx(5 * 1.0 + 50 * 1.0)  # the rest of this one, then a whole twin
    short = StepClock(step0=0, iters=5, steps_per_eval=10, validates=False, clock=t)
    assert all(short.stepped(s) is None for s in range(1, 6))  # nothing worth estimating


def test_many_hours_on_a_cpu_names_the_faster_paths():
    slow = Estimate(step=5, iters=500, s_per_step=60.0, val_s=0, val_left=0, val_total=0, runs=2, device="cpu")
    first, second = lines(slow)
    assert first.startswith("expected training time: about 16 h 35 min more (60 s/step measured on cpu over steps 2-5;")
    assert "495 of 500 steps left and the plain twin" in first
    for way in ("smaller model", "Apple Silicon", "NVIDIA GPU", "mlx[cuda12|cuda13]"):
        assert way in second
    assert len(lines(Estimate(5, 500, 60.0, 0, 0, 0, 2, "cuda"))) == 1  # not a CPU: no advice
    assert len(lines(Estimate(5, 500, 0.2, 0, 0, 0, 1, "cpu"))) == 1  # minutes: no advice
    assert duration(59) == "59 s" and duration(61) == "1 min 01 s" and duration(3 * 86400) == "3.0 days"
