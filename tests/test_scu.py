"""The SCU maths and controller, without MLX."""

from __future__ import annotations

import math

import pytest

from hegelion_queue import scu
from hegelion_queue.scu import ScuController


def test_bits_per_token_and_s_ratio():
    assert scu.data_bpt(math.log(2)) == pytest.approx(1.0)
    # Σw² = 2σ²·N·ln2 is exactly one bit per token
    assert scu.param_bpt(2 * 0.01**2 * 1000 * math.log(2), 0.01, 1000) == pytest.approx(1.0)
    assert scu.param_bpt(4.0, 0.01, 1000) == pytest.approx(4 * scu.param_bpt(1.0, 0.01, 1000))  # quadratic in w
    assert scu.s_ratio(3.0, 1.0) == pytest.approx(0.25)
    assert scu.s_ratio(0.0, 0.0) == 0.0


def test_s_above_target_raises_lambda_and_below_lowers_it():
    up, down = ScuController(), ScuController()
    assert up.update(0.05) > 1.0
    assert down.update(0.001) < 1.0


def test_first_measurement_is_taken_as_is_then_smoothed():
    c = ScuController(ema_alpha=0.1)
    c.update(0.05)
    assert c.s_hat == 0.05
    c.update(0.15)
    assert c.s_hat == pytest.approx(0.1 * 0.15 + 0.9 * 0.05)


def test_deadband_holds_lambda_and_only_leaks_the_integral():
    c = ScuController(target_s=0.01, deadband=0.002, leak=0.9)
    c.integral = 0.1
    lam = c.update(0.0115)  # |e| = 0.0015 <= deadband
    assert lam == c.lam == 1.0
    assert c.integral == pytest.approx(0.09)


def test_integral_leaks_and_accumulates_outside_the_deadband():
    c = ScuController(ki=0.15, leak=0.5, kp=0.0)
    c.integral = 0.1
    c.update(0.02)  # e = 0.01
    assert c.integral == pytest.approx(0.5 * 0.1 + 0.15 * 0.01)
    assert c.lam == pytest.approx(math.exp(c.integral))


def test_lambda_and_integral_are_clamped():
    c = ScuController(lambda_max=10.0, integral_max=0.2)
    for _ in range(100):
        c.update(0.9)
    assert c.lam == 10.0 and c.integral <= 0.2
    c = ScuController(target_s=0.5, lambda_min=1e-4, integral_min=-0.2)
    for _ in range(100):
        c.update(0.0)
    assert c.lam == 1e-4 and c.integral >= -0.2


def test_anti_windup_no_integration_at_a_bound_pushing_outwards():
    c = ScuController(lambda_init=10.0, lambda_max=10.0, leak=1.0)
    for _ in range(50):
        c.update(0.5)  # S far above target wants ever more λ, but λ is at its maximum
    assert c.lam == 10.0
    assert c.integral == 0.0  # not wound up (it would sit at integral_max = 0.2 otherwise)
    # the error reverses: λ leaves the bound at the next update instead of sitting out a wound-up integral
    c.s_hat = None
    assert c.update(0.0) < 10.0


def test_anti_windup_at_the_lower_bound():
    c = ScuController(lambda_init=1e-4, lambda_min=1e-4, leak=1.0)
    for _ in range(50):
        c.update(0.0)
    assert c.lam == 1e-4 and c.integral == 0.0


def _plant(lam: float) -> float:
    """ParamBPT a training run would settle at under λ (weights shrink as λ grows); DataBPT is 2 bits."""
    return 1.0 / (1.0 + 10.0 * lam)


def test_closed_loop_settles_inside_the_deadband():
    c = ScuController(target_s=0.01, deadband=0.002)
    p, s_seen = 1.0, []
    for _ in range(500):
        p += 0.3 * (_plant(c.lam) - p)  # the weights follow λ with a lag
        s = scu.s_ratio(2.0, p)
        c.update(s)
        s_seen.append(s)
    assert all(abs(s - 0.01) <= 0.002 for s in s_seen[-100:])
    assert abs(c.s_hat - 0.01) <= 0.002
    assert c.lambda_min < c.lam < c.lambda_max  # an interior equilibrium, not a bound


def test_settled_detects_a_flat_lambda_history():
    assert not scu.settled([1.0, 2.0], window=5)
    assert not scu.settled([1.0, 1.5, 2.0, 2.5], window=3, rel_tol=0.01)
    assert scu.settled([5.0, 1.0, 1.001, 1.002, 1.0], window=3, rel_tol=0.01)
    assert not scu.settled([1.0] * 20, window=0)


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        ScuController(lambda_min=0.0)
