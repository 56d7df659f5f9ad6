"""Confidence intervals for the eval and the ablation. Pure (the bootstrap takes numpy when it is there).

- over seeds: the Student-t interval of a mean (`mean_interval`), also for paired differences;
- a held-out cross-entropy: a percentile bootstrap over held-out samples (`bootstrap_ce`, `bootstrap_ce_diff`): CE is
  a ratio (loss summed over answer tokens / tokens), so whole samples are resampled, not tokens;
- a proportion such as format adherence: the Wilson score interval (`wilson`), right at 0/n and n/n too.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence

LEVEL = 0.95
BOOTSTRAP_REPS = 2000


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The Student-t quantile: t_cdf(t_quantile(p, df), df) == p (bisection; |error| < 1e-10)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError("need 0 < p < 1 and df > 0")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-10:
            break
    return (lo + hi) / 2.0


def mean_interval(values: Sequence[float], level: float = LEVEL) -> dict:
    """n, mean, sd and the t-interval of the mean (`ci`: None for fewer than 2 values)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci": None}
    mean = statistics.fmean(vals)
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "ci": None}
    sd = statistics.stdev(vals)
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci": [mean - half, mean + half]}


def wilson(k: int, n: int, level: float = LEVEL) -> list[float] | None:
    """The Wilson score interval of a proportion k/n."""
    if n <= 0:
        return None
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2.0)
    p = k / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half)]


def _resamples(n: int, reps: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(n) for _ in range(n)] for _ in range(reps)]


def _percentiles(stats: list[float], level: float) -> list[float]:
    stats = sorted(stats)
    lo_i = int(math.floor((1.0 - level) / 2.0 * (len(stats) - 1)))
    hi_i = int(math.ceil((1.0 + level) / 2.0 * (len(stats) - 1)))
    return [stats[lo_i], stats[hi_i]]


def _ratio_stats(numerators: Sequence[Sequence[float]], tokens: Sequence[float], reps: int, seed: int) -> list[float]:
    """For each resample of samples: Σ(num_0 − num_1 …)/Σ tokens, numerators combined with signs +, −."""
    n = len(tokens)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency; the pure path keeps this module standalone
        out = []
        for idx in _resamples(n, reps, seed):
            den = sum(tokens[i] for i in idx)
            num = sum(sum(s * nums[i] for s, nums in zip((1, -1), numerators)) for i in idx)
            out.append(num / den if den else float("nan"))
        return out
    rng = np.random.default_rng(seed)
    combined = np.asarray(numerators[0], float) - (np.asarray(numerators[1], float) if len(numerators) > 1 else 0.0)
    den = np.asarray(tokens, float)
    out: list[float] = []
    for start in range(0, reps, 100):  # 100 resamples at a time: memory stays at 100 x n indices
        idx = rng.integers(0, n, (min(100, reps - start), n))
        out += (combined[idx].sum(axis=1) / den[idx].sum(axis=1)).tolist()
    return out


def bootstrap_ce(losses: Sequence[float], tokens: Sequence[float], reps: int = BOOTSTRAP_REPS, seed: int = 0,
                 level: float = LEVEL) -> list[float] | None:
    """Percentile-bootstrap interval of CE = Σ losses / Σ tokens, resampling held-out samples (each sample's summed
    loss and its token count)."""
    if len(tokens) < 2 or not sum(tokens):
        return None
    return _percentiles(_ratio_stats([losses], tokens, reps, seed), level)


def bootstrap_ce_diff(losses_a: Sequence[float], losses_b: Sequence[float], tokens: Sequence[float],
                      reps: int = BOOTSTRAP_REPS, seed: int = 0, level: float = LEVEL) -> list[float] | None:
    """Paired: the interval of CE_a − CE_b on the same held-out samples (the same resamples for both)."""
    if len(tokens) < 2 or not sum(tokens):
        return None
    return _percentiles(_ratio_stats([losses_a, losses_b], tokens, reps, seed), level)
