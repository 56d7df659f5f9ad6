"""The intervals behind eval.json and ablation.json, checked against published values and by simulation."""

from __future__ import annotations

import random
import statistics

import pytest

from hegelion_queue.training import intervals


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423),
                                         (1000, 1.9623)])
def test_t_quantile_matches_the_tables(df, expected):
    assert intervals.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert intervals.t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_mean_interval_over_seeds():
    got = intervals.mean_interval([1.0, 2.0, 3.0])
    assert got["n"] == 3 and got["mean"] == 2.0 and got["sd"] == 1.0
    half = 4.3027 / 3**0.5
    assert got["ci"] == pytest.approx([2 - half, 2 + half], abs=1e-3)
    assert intervals.mean_interval([0.5])["ci"] is None and intervals.mean_interval([])["mean"] is None


def test_wilson_interval():
    assert intervals.wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)  # right at 0/n, where Wald gives [0, 0]
    assert intervals.wilson(10, 10)[1] == 1.0
    assert intervals.wilson(26, 30) == pytest.approx([0.7032, 0.9469], abs=1e-4)
    assert intervals.wilson(3, 0) is None


def test_t_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = random.Random(7)
    hits = sum(lo <= 5.0 <= hi for lo, hi in (intervals.mean_interval([rng.gauss(5, 2) for _ in range(3)])["ci"]
                                               for _ in range(2000)))
    assert 0.93 < hits / 2000 < 0.97


def test_bootstrap_ce_is_a_ratio_interval_and_the_paired_one_removes_shared_noise():
    rng = random.Random(3)
    tokens = [rng.randint(20, 200) for _ in range(60)]
    losses = [t * rng.uniform(1.0, 3.0) for t in tokens]  # per-sample difficulty varies a lot
    ce = sum(losses) / sum(tokens)
    lo, hi = intervals.bootstrap_ce(losses, tokens)
    assert lo < ce < hi and hi - lo < 0.5
    better = [x * 0.97 for x in losses]  # 3 % lower on every sample
    d_lo, d_hi = intervals.bootstrap_ce_diff(better, losses, tokens)
    assert d_hi < 0 and d_hi - d_lo < 0.2 * (hi - lo)  # paired: far narrower than either CE's own interval
    assert intervals.bootstrap_ce([1.0], [3]) is None
    assert intervals.bootstrap_ce(losses, tokens, seed=1) != intervals.bootstrap_ce(losses, tokens, seed=2)
    assert statistics.fmean([lo, hi]) == pytest.approx(ce, rel=0.05)
