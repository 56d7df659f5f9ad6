"""Shannon Control Unit maths: bits per token, the information ratio S and the PI controller for λ. Pure.

S = ParamBPT / (DataBPT + ParamBPT) is the share of the description length spent on the adapter's weights.
Raising λ (the weight of the ParamBPT penalty) shrinks the weights and so lowers S: the controller therefore
raises λ when S is above its target S* and lowers it when S is below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LN2 = math.log(2.0)


def data_bpt(ce_nats: float) -> float:
    """Cross-entropy per token in nats -> bits per token."""
    return ce_nats / LN2


def param_bpt(sum_w2: float, sigma: float, tokens: int) -> float:
    """Bits per token to encode the weights under a N(0, σ²) prior, spread over `tokens` tokens per epoch."""
    return sum_w2 / (2.0 * sigma * sigma * tokens * LN2)


def s_ratio(data_bpt: float, param_bpt: float) -> float:
    total = data_bpt + param_bpt
    return param_bpt / total if total > 0 else 0.0


def _clamp(x: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, x))


@dataclass
class ScuController:
    """PI control of λ in log space, two laws.

    `reference` (the defaults): the published law, e = EMA(S) − S*, λ ← clamp(λ·exp(kp·e + I)),
    I ← clamp(leak·I + ki·e). I is added to log λ at every update, so log λ integrates it again: after a large
    early error λ keeps moving the same way long after S crossed S*, and with |e| ~ S* ≈ 0.01 one update moves
    λ by under 1 %, so it needs ~170 updates to settle.

    `pi` (the trainer's): e = ln(EMA(S) / S*), a relative error (S at twice S* is the same push whatever S* is),
    and the textbook PI in velocity form, log λ ← clamp(log λ + gain·(kp·(e − e_prev) + ki·e)). log λ itself is
    the integrator, so clamping λ is the whole anti-windup and nothing is left over to push λ on once S has
    crossed S*: from the first update below S* the integral term turns λ down. Control starts when S first
    reaches S* (`armed`): before that S is low only because nothing has been learned yet, and lowering λ then
    would just have to be undone. `deadband` is in the units of e (relative for `pi`).
    """

    target_s: float = 0.01
    kp: float = 0.8
    ki: float = 0.15
    deadband: float = 0.002
    lambda_init: float = 1.0
    lambda_min: float = 1e-4
    lambda_max: float = 10.0
    integral_min: float = -0.2
    integral_max: float = 0.2
    leak: float = 0.995
    ema_alpha: float = 0.1
    law: str = "reference"  # or "pi"
    error_clip: float = 2.0  # pi: |e| is capped (S = 0 at the first step would be -inf)

    def __post_init__(self) -> None:
        if not 0 < self.lambda_min <= self.lambda_max:
            raise ValueError("need 0 < lambda_min <= lambda_max")
        if self.law not in LAWS:
            raise ValueError(f"law must be one of {', '.join(LAWS)}")
        if not self.target_s > 0:
            raise ValueError("target_s must be > 0")
        self.lam = _clamp(self.lambda_init, self.lambda_min, self.lambda_max)
        self.integral = 0.0  # reference: I
        self.e_prev = 0.0  # pi: the error of the last update
        self.s_hat: float | None = None
        self.armed = self.law == "reference"

    def update(self, s_measured: float, gain: float = 1.0) -> float:
        """Feed one measurement of S; returns the new λ. `gain` (pi only) scales the step: the trainer passes
        the learning rate's share of its peak, because the weights, and so S, follow λ only that fast."""
        # The first measurement is taken as is: an EMA started at 0 would read "S far below target" for a while.
        self.s_hat = s_measured if self.s_hat is None else (
            self.ema_alpha * s_measured + (1.0 - self.ema_alpha) * self.s_hat
        )
        if self.law == "pi":
            return self._pi(gain)
        e = self.s_hat - self.target_s
        if abs(e) <= self.deadband:
            self.integral *= self.leak  # close enough: hold λ, let old error fade
            return self.lam
        # Anti-windup: at a bound, an error that pushes further out would only pile up in the integral
        # and later hold λ at the bound long after the error reversed.
        saturated = (self.lam >= self.lambda_max and e > 0) or (self.lam <= self.lambda_min and e < 0)
        if saturated:
            self.integral *= self.leak
        else:
            self.integral = _clamp(self.leak * self.integral + self.ki * e, self.integral_min, self.integral_max)
        self.lam = _clamp(self.lam * math.exp(self.kp * e + self.integral), self.lambda_min, self.lambda_max)
        return self.lam

    def _pi(self, gain: float) -> float:
        e = _clamp(math.log(max(self.s_hat, 1e-12) / self.target_s), -self.error_clip, self.error_clip)
        if abs(e) <= self.deadband:
            e = 0.0
        if not self.armed:
            if e < 0:
                return self.lam
            self.armed, self.e_prev = True, e  # a bumpless start: no proportional kick
        step = gain * (self.kp * (e - self.e_prev) + self.ki * e)
        self.e_prev = e
        self.lam = _clamp(self.lam * math.exp(step), self.lambda_min, self.lambda_max)
        return self.lam


LAWS = ("reference", "pi")


def settled(lambdas: Sequence[float], window: int = 10, rel_tol: float = 0.01) -> bool:
    """True when λ moved less than `rel_tol` (relative) over the last `window` updates: an early-stop signal."""
    if window < 1 or len(lambdas) < window + 1:
        return False
    recent = lambdas[-(window + 1) :]
    ref = max(abs(recent[-1]), 1e-12)
    return (max(recent) - min(recent)) / ref < rel_tol
