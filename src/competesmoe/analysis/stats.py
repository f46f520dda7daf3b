"""Statistics of seed-to-seed comparisons: confidence intervals, t-tests, detectable effects.

Pure Python (no scipy at run time): Student's t distribution through the regularised incomplete beta
function, I_x(a, b), evaluated by its continued fraction (modified Lentz), and its quantiles by bisection.
`tests/test_compare_stats.py` checks every number against scipy.

- `summary(xs)`: mean, sample std (n − 1), and the two-sided t interval mean ± t_{1−α/2, n−1}·s/√n.
- `paired(a, b)`: the mean of the differences a_i − b_i (runs that share a seed share the data order and
  the initialisation of the shared parts in `competesmoe compare`), its t interval and two-sided p-value.
- `welch(a, b)`: difference of means with Welch's standard error and Welch–Satterthwaite degrees of freedom.
- `detectable(se, df)`: the smallest true difference that a two-sided level-α t-test detects with the
  given power, (t_{1−α/2, df} + t_{power, df})·SE — the usual closed form, which treats the test statistic
  under the alternative as a shifted central t (a close approximation to the non-central t).
- `seeds_needed(delta, sd, paired)`: the smallest number of seeds per arm at which `detectable` falls to
  |delta| with the same per-seed spread sd (paired: sd of the differences; unpaired: the per-arm sd).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

ALPHA = 0.05
POWER = 0.8


# --- Student's t distribution ---------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b), a, b > 0, 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0, got {a}, {b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))   # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_sf2(t: float, df: float) -> float:
    """Two-sided p-value P(|T| >= |t|)."""
    if math.isnan(t):
        return float("nan")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t: the t with P(T <= t) = p, 0 < p < 1 (bisection to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile needs 0 < p < 1, got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# --- summaries and tests --------------------------------------------------------------------------
@dataclass
class Summary:
    n: int
    mean: float
    std: float | None          # sample standard deviation (n − 1); None for one value
    ci: tuple[float, float] | None   # two-sided (1 − α) t interval of the mean; None for one value

    def as_dict(self) -> dict:
        return asdict(self)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _var(xs: Sequence[float]) -> float:
    m = _mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def summary(xs: Sequence[float], alpha: float = ALPHA) -> Summary:
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("summary of no values")
    m = _mean(xs)
    if len(xs) < 2:
        return Summary(len(xs), m, None, None)
    s = math.sqrt(_var(xs))
    half = t_ppf(1 - alpha / 2, len(xs) - 1) * s / math.sqrt(len(xs))
    return Summary(len(xs), m, s, (m - half, m + half))


@dataclass
class Difference:
    """a − b (arm minus baseline) with its interval and test."""
    test: str                  # "paired" or "welch"
    n_a: int
    n_b: int
    diff: float
    se: float
    df: float
    ci: tuple[float, float]
    p: float
    sd: float                  # paired: sd of the differences; welch: pooled per-arm sd (for planning)
    detectable: float          # smallest |true difference| detected with `power` at level α
    alpha: float = ALPHA
    power: float = POWER

    @property
    def distinguishable(self) -> bool:
        return self.p < self.alpha

    def as_dict(self) -> dict:
        return {**asdict(self), "distinguishable": self.distinguishable}


def paired(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA, power: float = POWER) -> Difference:
    """Paired t-test of a_i − b_i (same seeds, same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired test needs equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError("paired test needs at least 2 pairs")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n, m = len(d), _mean(d)
    sd = math.sqrt(_var(d))
    se = sd / math.sqrt(n)
    df = n - 1
    return _difference("paired", len(a), len(b), m, se, df, sd, alpha, power)


def welch(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA, power: float = POWER) -> Difference:
    """Welch's unequal-variance t-test of mean(a) − mean(b)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's test needs at least 2 values per arm")
    va, vb = _var(a), _var(b)
    qa, qb = va / len(a), vb / len(b)
    se = math.sqrt(qa + qb)
    df = (qa + qb) ** 2 / (qa ** 2 / (len(a) - 1) + qb ** 2 / (len(b) - 1)) if se > 0 else len(a) + len(b) - 2
    sd = math.sqrt((va + vb) / 2)
    return _difference("welch", len(a), len(b), _mean(a) - _mean(b), se, df, sd, alpha, power)


def _difference(test, n_a, n_b, diff, se, df, sd, alpha, power) -> Difference:
    q = t_ppf(1 - alpha / 2, df)
    if se > 0:
        p = t_sf2(diff / se, df)
    else:
        p = 1.0 if diff == 0 else 0.0
    return Difference(test, n_a, n_b, diff, se, df, (diff - q * se, diff + q * se), p, sd,
                      detectable(se, df, alpha, power), alpha, power)


def compare_arms(a: dict[int, float], b: dict[int, float], alpha: float = ALPHA,
                 power: float = POWER) -> Difference:
    """Arm a minus baseline b, values keyed by seed: paired on the seeds both arms ran when there are at
    least two (seeds of one arm only are left out: a partial comparison keeps its pairing), Welch on all
    values when fewer seeds are shared."""
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        return paired([a[s] for s in common], [b[s] for s in common], alpha, power)
    return welch(list(a.values()), list(b.values()), alpha, power)


# --- power --------------------------------------------------------------------------------------------
def detectable(se: float, df: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest true |difference| that a two-sided level-α t-test with standard error `se` and `df`
    degrees of freedom detects with probability `power`: (t_{1−α/2, df} + t_{power, df})·se."""
    return (t_ppf(1 - alpha / 2, df) + t_ppf(power, df)) * se


def seeds_needed(delta: float, sd: float, paired_design: bool = True, alpha: float = ALPHA,
                 power: float = POWER, max_n: int = 1_000_000) -> int | None:
    """Smallest seeds per arm n with detectable(SE(n), df(n)) <= |delta|.

    Paired: SE = sd/√n, df = n − 1 (sd of the per-seed differences). Unpaired (equal n, equal variance):
    SE = sd·√(2/n), df = 2n − 2. None when delta is 0 or more than max_n seeds would be needed."""
    if delta == 0 or sd < 0:
        return None
    if sd == 0:
        return 2

    def ok(n: int) -> bool:
        se = sd / math.sqrt(n) if paired_design else sd * math.sqrt(2 / n)
        df = n - 1 if paired_design else 2 * n - 2
        return detectable(se, df, alpha, power) <= abs(delta)

    lo, hi = 2, 2
    while not ok(hi):
        lo, hi = hi, hi * 2
        if hi > max_n:
            return None
    while lo < hi:           # smallest n in (lo, hi] with ok(n); ok is monotone in n
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi
