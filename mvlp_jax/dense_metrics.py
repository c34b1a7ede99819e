"""Dense-task metrics: per-image Dice of binary masks, with patient-level bootstrap intervals and paired
differences (the same resamples for both encoders). NumPy only."""
from __future__ import annotations

import numpy as np

from mvlp_jax import metrics


def dice_per_image(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N,) Dice 2|P∩T| / (|P| + |T|) of boolean masks (N, H, W); an image whose mask and prediction are
    both empty scores 1 (nothing to find, nothing found)."""
    p, t = predicted.reshape(len(predicted), -1).astype(bool), truth.reshape(len(truth), -1).astype(bool)
    overlap, total = (p & t).sum(1), p.sum(1) + t.sum(1)
    return np.where(total == 0, 1.0, 2.0 * overlap / np.maximum(total, 1))


def mean_with_interval(values: np.ndarray, groups: np.ndarray, num: int, seed: int) -> dict:
    """Mean of per-image values with a 95% interval over resamples of whole patients."""
    draws = metrics.bootstrap_indices(groups, num, seed) if num else []
    return {"mean": float(np.mean(values)),
            "ci95": metrics.percentile_interval([float(np.mean(values[d])) for d in draws], 0.95)}


def paired_difference(baseline: np.ndarray, candidate: np.ndarray, groups: np.ndarray, num: int, seed: int) -> dict:
    """mean(candidate) - mean(baseline) per image, its interval over the same patient resamples, and the
    fraction of resamples where the candidate is not better."""
    diffs = np.asarray([float(np.mean(candidate[d] - baseline[d]))
                        for d in metrics.bootstrap_indices(groups, num, seed)])
    return {"difference": float(np.mean(candidate - baseline)), "interval": metrics.percentile_interval(diffs, 0.95),
            "p_not_better": float(np.mean(diffs <= 0)) if len(diffs) else float("nan")}
