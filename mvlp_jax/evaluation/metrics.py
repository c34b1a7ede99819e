"""Multi-label evaluation metrics: ROC AUC (ties averaged, as sklearn), mean AUC, exact-match accuracy and
average precision (their intervals: statistics.py). NumPy only; a mask marks labels that count (uncertain labels
under the `ignore` policy are masked out of every metric)."""

from __future__ import annotations

import warnings

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    return (starts + (counts + 1) / 2.0)[inverse]


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U); nan unless both classes are present."""
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(score, np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Step-wise average precision (sklearn's definition, ties grouped); nan without positives."""
    y = np.asarray(y).astype(bool)
    if not y.any():
        return float("nan")
    order = np.argsort(-np.asarray(score, np.float64), kind="mergesort")
    s, t = np.asarray(score)[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(t)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def per_label(labels: np.ndarray, scores: np.ndarray, mask: np.ndarray, fn) -> np.ndarray:
    return np.array([fn(labels[mask[:, j], j], scores[mask[:, j], j]) for j in range(labels.shape[1])])


def mean_auc(labels: np.ndarray, scores: np.ndarray, mask: np.ndarray) -> float:
    """Mean of the per-label AUCs defined on this set (labels lacking a class are left out)."""
    aucs = per_label(labels, scores, mask, roc_auc)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def exact_match_accuracy(labels: np.ndarray, probs: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of cases whose every counted label is right at `threshold`."""
    right = ((probs >= threshold) == labels.astype(bool)) | ~mask
    return float(np.mean(right.all(axis=1)))


def summary(labels: np.ndarray, probs: np.ndarray, mask: np.ndarray, names: list[str]) -> dict:
    aucs = per_label(labels, probs, mask, roc_auc)
    missing = [n for n, a in zip(names, aucs) if not np.isfinite(a)]
    if missing:
        warnings.warn(f"left out of mAUC (a class is absent from this set): {', '.join(missing)}", stacklevel=2)
    return {
        "mauc": mean_auc(labels, probs, mask),
        "accuracy": exact_match_accuracy(labels, probs, mask),
        "auc": dict(zip(names, map(float, aucs))),
        "ap": dict(zip(names, map(float, per_label(labels, probs, mask, average_precision)))),
        "labels_without_both_classes": missing,
    }
