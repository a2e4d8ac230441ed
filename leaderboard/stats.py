"""The few statistics the leaderboard needs: Student t quantiles, t-intervals and Welch's test.

Written here from the textbook formulas because scipy is not a dependency of the harness and the
leaderboard must stay light (it runs on login nodes without torch). Accuracy is far beyond what a
handful of seeds can use: the regularized incomplete beta converges to ~1e-12.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache


def _betacf(a: float, b: float, x: float) -> float:
    # Continued fraction of the incomplete beta function, evaluated with the modified Lentz method.
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return f


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The fraction converges fast only below the mean of the beta distribution: use symmetry above it.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` (possibly fractional) degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


@lru_cache(maxsize=65536)  # integer degrees of freedom repeat across thousands of groups
def t_ppf(p: float, df: float) -> float:
    """The p-quantile of Student's t.

    Newton's method from t = 0: the CDF is concave for t > 0, so each tangent step lands at or
    before the root and the iterates climb to it monotonically (no overshoot, no bracketing).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_ppf: p = {p} must be in (0, 1)")
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    log_norm = math.lgamma((df + 1.0) / 2.0) - math.lgamma(df / 2.0) - 0.5 * math.log(df * math.pi)
    t = 0.0
    for _ in range(200):
        density = math.exp(log_norm - (df + 1.0) / 2.0 * math.log1p(t * t / df))
        step = (t_cdf(t, df) - p) / density
        t -= step
        if abs(step) < 1e-12 * max(1.0, abs(t)):
            break
    return t


def t_halfwidth(std: float | None, n: int, level: float = 0.95) -> float | None:
    """Half-width of the two-sided t-interval of a mean from n values with sample std `std`."""
    if n < 2 or std is None:
        return None
    return t_ppf(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None below two values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def welch(baseline: Sequence[float], candidate: Sequence[float], alpha: float = 0.05,
          with_bound: bool = True) -> dict[str, float | None]:
    """Welch's one-sided test of "candidate mean < baseline mean", both sides needing >= 2 values.

    Returns the difference (candidate - baseline), its Welch-Satterthwaite degrees of freedom, the
    one-sided p-value, and the one-sided (1 - alpha) upper bound of the difference: when that
    bound is below zero the drop is significant at level alpha (None unless `with_bound`: the
    quantile at a fractional df is the costly part when thousands of configurations are compared).
    """
    mb, sb = mean_std(baseline)
    mc, sc = mean_std(candidate)
    if sb is None or sc is None:
        raise ValueError("welch: both sides need at least two values")
    vb, vc = sb * sb / len(baseline), sc * sc / len(candidate)
    diff = mc - mb
    se = math.sqrt(vb + vc)
    if se == 0.0:
        # Identical values within each side: any difference is exact, none is noise.
        return {"diff": diff, "df": float("inf"), "p": 0.0 if diff < 0 else 1.0, "upper": diff}
    df = (vb + vc) ** 2 / (vb * vb / (len(baseline) - 1) + vc * vc / (len(candidate) - 1))
    upper = diff + t_ppf(1.0 - alpha, df) * se if with_bound else None
    return {"diff": diff, "df": df, "p": t_cdf(diff / se, df), "upper": upper}
