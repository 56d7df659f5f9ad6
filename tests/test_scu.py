"""The SCU maths and controller, without MLX."""

from __future__ import annotations

import math

import pytest

from hegelion_queue.training import scu
from hegelion_queue.training.scu import ScuController


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


def reference_law(measurements, target=0.01, kp=0.8, ki=0.15, deadband=0.002, lam=1.0, lo=1e-4, hi=10.0,
                  imin=-0.2, imax=0.2, leak=0.995, alpha=0.1):
    """The published law, written out on its own: what ScuController() must reproduce."""
    s_hat, integral, out = None, 0.0, []
    for s in measurements:
        s_hat = s if s_hat is None else alpha * s + (1 - alpha) * s_hat
        e = s_hat - target
        if abs(e) <= deadband:
            integral *= leak
        elif (lam >= hi and e > 0) or (lam <= lo and e < 0):
            integral *= leak
        else:
            integral = min(imax, max(imin, leak * integral + ki * e))
            lam = min(hi, max(lo, lam * math.exp(kp * e + integral)))
        out.append(lam)
    return out


def test_the_reference_settings_are_the_published_law():
    measurements = [0.0, 0.002, 0.05, 0.3, 0.9, 0.9, 0.2, 0.011, 0.0105, 0.001, 0.0, 0.0, 0.05] * 5
    c = ScuController()
    assert [c.update(s) for s in measurements] == pytest.approx(reference_law(measurements), rel=1e-12)


def pi(**kw) -> ScuController:
    return ScuController(**{"law": "pi", "target_s": 0.1, "kp": 0.5, "ki": 0.05, "deadband": 0.05,
                            "ema_alpha": 1.0, **kw})


def test_pi_waits_until_s_first_reaches_its_target():
    c = pi()
    assert [c.update(s) for s in (0.0, 0.01, 0.05, 0.09)] == [1.0] * 4 and not c.armed  # learning, not yet S*
    assert c.update(0.2) > 1.0 and c.armed


def test_pi_error_is_relative_so_any_target_gets_the_same_push():
    small, big = pi(target_s=0.01), pi(target_s=0.3)
    small.update(0.02), big.update(0.6)  # both at twice their target
    assert small.lam == pytest.approx(big.lam) == pytest.approx(math.exp(0.05 * math.log(2)))


def test_pi_turns_lambda_down_at_the_first_update_below_target():
    c = pi(ki=0.2)
    for _ in range(30):
        c.update(0.5)  # far above: λ climbs to its bound
    assert c.lam == 10.0
    c.update(0.05)  # below S* now: no wound-up integral keeps it up
    assert c.lam < 10.0


def test_pi_holds_lambda_in_the_deadband_and_when_the_optimiser_stands_still():
    c = pi()
    c.update(0.2)
    c.update(0.101)  # into the band: the proportional part of the last push is taken back, once
    held = c.lam
    assert c.update(0.102) == held and c.update(0.098) == held  # |ln(S/S*)| <= 0.05
    c.update(0.4, gain=0.0)  # learning rate 0: the weights cannot follow, so neither does λ
    assert c.lam == held


def test_pi_closed_loop_settles_on_a_lagging_plant():
    """A plant like the trainer's: S rises as learning goes on, falls with λ, and follows λ with a lag."""
    c, s, history = pi(), 0.0, []
    for step in range(1, 801):
        learned = 1 - math.exp(-step / 100)
        target = 0.3 * learned / (1 + c.lam) ** 0.7  # where S would settle at this λ
        s += (target - s) / 20  # a 20-step lag
        history.append((s, c.update(s)))
    tail = [lam for _, lam in history[-160:]]
    assert (max(tail) - min(tail)) / tail[-1] < 0.05 and 1e-4 < tail[-1] < 10
    assert 0.9 * 0.1 <= history[-1][0] <= 1.1 * 0.1  # S held at S*
