"""Intervals and paired differences for a study: seeds x problems, resampled in two stages.

A study's number for one arm (a model at step 0, or an objective's final checkpoint) is the
mean over its S seeds and P eval problems of a per-problem score (the share of a problem's
samples that are correct, or its unbiased pass@k), X[s, p]. Three things make it uncertain:
which seeds ran (training randomness), which problems the eval set holds (a sample of MATH),
and the finite samples per problem (eval noise). Two arms compared on the same problems share
the second: their difference is taken problem by problem.

The bootstrap resamples seeds and then problems:
- seeds, with replacement, each arm on its own, or as pairs when both arms have the same seeds
  (the same seed is the same data order and sampling stream; objective - base pairs a run with
  its own step 0). A seed's mean carries its eval noise, so this stage holds the seeds' spread
  and the eval noise together, estimated from S seeds: S - 1 degrees of freedom;
- problems, with replacement, the same draw for both arms, over the per-problem difference of
  the seed means, their deviations shrunk to the problem-to-problem spread beyond the eval noise
  the seed stage already holds (Davison & Hinkley 1997, section 3.8; resampled raw, the noise
  would count twice).

The interval is the estimate +- t x the bootstrap SE, t with Welch-Satterthwaite degrees of
freedom from the two stages' variances: with 3 seeds whose means spread it is close to a t with
2 degrees of freedom (4.30 x SE); one seed per arm leaves only the problem stage (~1.96 x SE),
and cannot see seed-to-seed spread at all. A plain percentile interval of 3 seeds covers far less
than it claims. The smallest detectable difference (two-sided 5% test, 80% power) is
(t_0.975 + t_0.80) x SE. Pure numpy; coverage and false positives are tested on synthetic
studies with a known truth (tests/test_study_stats.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
POWER = 0.80
N_BOOT = 2000


@dataclass(frozen=True)
class Estimate:
    """A mean (or difference) with its 95% interval; pass rates as fractions."""
    mean: float
    lo: float
    hi: float
    se: float
    df: float  # degrees of freedom of the t multiplier
    mde: float  # smallest difference this design detects (5% two-sided, 80% power)
    n_seeds: tuple[int, ...]  # per arm
    n_problems: int
    seed_share: float  # share of the variance from seeds (0 when no arm has 2 seeds)

    @property
    def distinguishable(self) -> bool:
        return self.lo > 0 or self.hi < 0


def t_quantile(q: float, df: float) -> float:
    """Student's t quantile for 0.5 <= q <= 0.99 and df >= 1 (df below 1 counts as 1): the
    density integrated on a fine grid (error < 1e-6) and inverted; the normal one for huge df."""
    if not 0.5 <= q <= 0.99:
        raise ValueError(f"need 0.5 <= q <= 0.99, got {q}")
    x = np.linspace(0.0, 64.0, 1 << 14)
    if df > 1e7:
        log_f = -x * x / 2 - 0.5 * math.log(2 * math.pi)
    else:
        df = max(df, 1.0)
        log_f = (math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
                 - (df + 1) / 2 * np.log1p(x * x / df))
    f = np.exp(log_f)
    cdf = 0.5 + np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) / 2) * (x[1] - x[0])])
    return float(np.interp(q, cdf, x))


def _noise_ms(x: np.ndarray) -> float:
    """The two-way residual mean square of X [seeds, problems]: the sampling noise (and
    seed x problem interaction) of one cell, with (S-1)(P-1) degrees of freedom."""
    s, p = x.shape
    if s < 2 or p < 2:
        return 0.0
    resid = x - x.mean(1)[:, None] - x.mean(0)[None, :] + x.mean()
    return float((resid ** 2).sum() / ((s - 1) * (p - 1)))


def _seed_stage(x: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """Resampled seed means (centred): their variance is var(seed means) / S, the seeds' own
    spread and their eval noise together, estimated from the S seeds (S - 1 degrees of
    freedom). One seed: nothing to resample (0)."""
    s = x.shape[0]
    if s < 2:
        return np.zeros(n_boot)
    dev = x.mean(1) - x.mean()
    dev = dev * math.sqrt(s / (s - 1))  # resampling S values with replacement: unbiased
    return dev[rng.integers(0, s, size=(n_boot, s))].mean(1)


def _problem_stage(cols: np.ndarray, noise: float, noise_df: float, rng: np.random.Generator,
                   n_boot: int) -> tuple[np.ndarray, float]:
    """Resampled problems (centred) of the per-problem seed means, the same draw for every
    arm, their deviations shrunk to the problem-to-problem spread beyond the eval noise that
    the seed stage already carries (`noise`: that noise's variance in one column, estimated
    with `noise_df` degrees of freedom); and the degrees of freedom of that spread, a
    difference of two mean squares (Satterthwaite)."""
    p = len(cols)
    dev = cols - cols.mean()
    spread, total = (dev ** 2).mean(), dev.var(ddof=1) if p > 1 else 0.0
    between = max(0.0, total - noise)
    dev = dev * math.sqrt(between / spread) if spread > 0 else dev
    denom = total ** 2 / max(p - 1, 1) + (noise ** 2 / noise_df if noise_df else 0.0)
    df = between ** 2 / denom if denom > 0 else math.inf
    return dev[rng.integers(0, p, size=(n_boot, p))].mean(1), df


def bootstrap(arms: list[tuple[np.ndarray, float]], rng: np.random.Generator,
              n_boot: int = N_BOOT) -> Estimate:
    """Sum of sign x mean(X) over `arms` [(X [seeds, problems], sign)], all on the same problems
    (columns aligned), with its interval. Pair arms beforehand (one arm of X_a - X_b) when
    their seeds are the same."""
    p = arms[0][0].shape[1]
    if any(x.shape[1] != p for x, _ in arms) or p == 0:
        raise ValueError("every arm needs the same, non-zero number of problems")
    point = sum(sign * x.mean() for x, sign in arms)
    seed_parts = [sign * _seed_stage(x, rng, n_boot) for x, sign in arms]
    cols = sum(sign * x.mean(0) for x, sign in arms)
    # an arm of one seed has no seed stage: its noise stays in the problem stage
    seeded = [x for x, _ in arms if x.shape[0] > 1]
    noise = sum(_noise_ms(x) / x.shape[0] for x in seeded)
    noise_df = sum((x.shape[0] - 1) * (p - 1) for x in seeded)
    prob, prob_df = _problem_stage(cols, noise, noise_df, rng, n_boot)
    reps = point + prob + sum(seed_parts)
    v_prob = float(prob.var(ddof=1))
    v_seeds = [float(part.var(ddof=1)) for part in seed_parts]
    terms = [(v_prob, prob_df)] + [(v, x.shape[0] - 1) for v, (x, _) in zip(v_seeds, arms)
                                 if x.shape[0] > 1]
    total = sum(v for v, _ in terms)
    denom = sum(v ** 2 / max(d, 1) for v, d in terms)
    df = total ** 2 / denom if denom > 0 else math.inf
    se = float(reps.std(ddof=1))
    t = t_quantile((1 + LEVEL) / 2, df)
    return Estimate(float(point), float(point - t * se), float(point + t * se), se, df,
                    (t + t_quantile(POWER, df)) * se, tuple(x.shape[0] for x, _ in arms), p,
                    sum(v_seeds) / total if total > 0 else 0.0)


def level(x: np.ndarray, rng: np.random.Generator, n_boot: int = N_BOOT) -> Estimate:
    """One arm's mean over seeds and problems, with its interval."""
    return bootstrap([(x, 1.0)], rng, n_boot)


def difference(xa: np.ndarray, seeds_a: list, xb: np.ndarray, seeds_b: list,
               rng: np.random.Generator, n_boot: int = N_BOOT) -> Estimate:
    """mean(A) - mean(B) on the same problems; seeds paired when both arms have the same ones
    (rows matched by seed), resampled each on its own otherwise."""
    if sorted(seeds_a) == sorted(seeds_b) and len(set(seeds_a)) == len(seeds_a):
        order = [list(seeds_b).index(s) for s in seeds_a]
        paired = bootstrap([(xa - xb[order], 1.0)], rng, n_boot)
        return paired
    return bootstrap([(xa, 1.0), (xb, -1.0)], rng, n_boot)
