"""The one bootstrap of every evaluator: a metric with the 95% interval of its two sources of chance, which test
patients were drawn (whole patients resampled with replacement) and which seed trained the head (its label subset
and its initialisation), and paired differences between two encoders on the same draws.

A head trained on few cases moves with its seed by more than a patient bootstrap shows: with several seeds, each
draw resamples the test patients *and* picks one seed's head, so the interval covers both; the point estimate is
the mean over seeds, reported with their spread.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

Statistic = Callable[[np.ndarray], float]  # case indices (a resample, repeats allowed) -> value

SMALL_TRAINING_SET = 300  # labelled training cases under which a head's seed matters
SEEDS_WHEN_SMALL = 3
MIN_CASES, MIN_PATIENTS = 10, 5  # a test split smaller than this is refused: no metric or interval means much


def require(groups: np.ndarray, where: str, intervals: bool = True) -> None:
    """Refuses (ValueError with the counts) a test split too small to estimate a metric and its interval; without
    intervals (bootstrap=0: a plumbing check on a set of a few patients) only too few cases."""
    patients = len(set(groups.tolist()))
    if len(groups) < MIN_CASES or (intervals and patients < MIN_PATIENTS):
        raise ValueError(
            f"{where} has {len(groups)} test cases of {patients} patients: too few to estimate a metric "
            f"and its interval (at least {MIN_CASES} cases of {MIN_PATIENTS} patients"
            + (
                "; bootstrap=0 reports the metric of at least that many cases without an interval)"
                if len(groups) >= MIN_CASES
                else ")"
            )
        )


def seeds_for(setting: int, fraction: float, training_cases: int, head_is_random: bool) -> int:
    """How many seeds train a head: `setting` when > 0; else (auto) SEEDS_WHEN_SMALL where the seed changes
    something (a label subset under 100%, or a randomly initialised head) and the head learns from little (under
    100% of the labels, or fewer than SMALL_TRAINING_SET cases); 1 otherwise."""
    if setting > 0:
        return setting
    varies = fraction < 1.0 or head_is_random
    return SEEDS_WHEN_SMALL if varies and (fraction < 1.0 or training_cases < SMALL_TRAINING_SET) else 1


def bootstrap_indices(groups: np.ndarray, num: int, seed: int) -> list[np.ndarray]:
    """Case indices of `num` resamples that draw whole patients (groups) with replacement."""
    rng = np.random.default_rng(seed)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    return [np.concatenate([members[g] for g in rng.integers(0, len(unique), len(unique))]) for _ in range(num)]


def percentile_interval(values: Sequence[float], level: float = 0.95) -> list[float]:
    """The central `level` interval of the draws; [nan, nan] (not estimable) when fewer than half of them have a
    value (e.g. most resamples hold no positive case of a label)."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    alpha = (1 - level) / 2
    if not len(finite) or len(finite) < len(values) / 2:
        return [float("nan")] * 2
    return [float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))]


def _draws(groups: np.ndarray, num: int, seed: int, seeds: int) -> list[tuple[int, np.ndarray]]:
    """(seed index, case indices) of each draw: the patients of `bootstrap_indices` and a seed picked per draw."""
    picks = np.random.default_rng([seed, seeds]).integers(0, seeds, num) if seeds > 1 else np.zeros(num, int)
    return list(zip(picks.tolist(), bootstrap_indices(groups, num, seed)))


def _quiet(fn: Callable[[], list[float]]) -> list[float]:
    with warnings.catch_warnings():  # a resample without one class of a label: that label's AUC is nan
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn()


def estimate(statistics: Sequence[Statistic], groups: np.ndarray, num: int, seed: int, level: float = 0.95) -> dict:
    """`statistics`: the metric of one trained head each (one per seed). -> {"mean": over seeds, of each on every
    case; "ci95": the interval of `num` draws of patients and a seed; with several seeds also "seeds" (each one's
    value) and "spread" [min, max]}."""
    everything = np.arange(len(groups))
    per_seed = _quiet(lambda: [float(s(everything)) for s in statistics])
    values = _quiet(lambda: [float(statistics[k](d)) for k, d in _draws(groups, num, seed, len(statistics))])
    out = {
        "mean": float(np.nanmean(per_seed)) if np.isfinite(per_seed).any() else float("nan"),
        "ci95": percentile_interval(values, level),
    }
    if len(statistics) > 1:
        out.update(seeds=per_seed, spread=[float(np.nanmin(per_seed)), float(np.nanmax(per_seed))])
    return out


def paired(
    baseline: Sequence[Statistic],
    candidate: Sequence[Statistic],
    groups: np.ndarray,
    num: int,
    seed: int,
    level: float = 0.95,
) -> dict:
    """candidate - baseline (one statistic per seed each, seed i of both trained on the same label subset): the
    mean difference on every case, its interval over the same draws of patients and seed for both, and the
    fraction of draws where the candidate is not better."""
    everything = np.arange(len(groups))
    means = _quiet(lambda: [c(everything) - b(everything) for b, c in zip(baseline, candidate)])
    diffs = np.asarray(
        _quiet(lambda: [candidate[k](d) - baseline[k](d) for k, d in _draws(groups, num, seed, len(baseline))]),
        np.float64,
    )
    finite = diffs[np.isfinite(diffs)]
    return {
        "difference": float(np.nanmean(means)),
        "interval": percentile_interval(list(diffs), level),
        "p_not_better": float(np.mean(finite <= 0)) if len(finite) else float("nan"),
    }
