"""Dense-task metrics: per-image Dice of binary masks and COCO-style mean average precision of boxes (their
intervals: statistics.py). NumPy only."""

from __future__ import annotations

import numpy as np


def dice_per_image(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N,) Dice 2|P∩T| / (|P| + |T|) of boolean masks (N, H, W); an image whose mask and prediction are
    both empty scores 1 (nothing to find, nothing found)."""
    p, t = predicted.reshape(len(predicted), -1).astype(bool), truth.reshape(len(truth), -1).astype(bool)
    overlap, total = (p & t).sum(1), p.sum(1) + t.sum(1)
    return np.where(total == 0, 1.0, 2.0 * overlap / np.maximum(total, 1))


IOU_THRESHOLDS = tuple(round(0.4 + 0.05 * i, 2) for i in range(8))  # 0.40, 0.45, ..., 0.75 (M-FLAG's RSNA mAP)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETECTIONS = 100


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of x0, y0, x1, y1 boxes."""
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=-1)
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-12)


def match_image(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    true_boxes: np.ndarray,
    true_labels: np.ndarray,
    num_classes: int,
    thresholds: tuple[float, ...] = IOU_THRESHOLDS,
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Per class: (scores of its best MAX_DETECTIONS detections, high first; true-positive flags (thresholds,
    detections); number of true boxes). COCO's greedy matching: each detection, in score order, takes the
    unmatched true box of highest IoU at or above the threshold."""
    out = []
    for c in range(num_classes):
        order = np.argsort(-scores[labels == c], kind="mergesort")[:MAX_DETECTIONS]
        det, det_scores = boxes[labels == c][order], scores[labels == c][order]
        truth = true_boxes[true_labels == c]
        ious = box_iou(det, truth) if len(det) and len(truth) else np.zeros((len(det), len(truth)))
        tp = np.zeros((len(thresholds), len(det)), bool)
        for t, threshold in enumerate(thresholds):
            taken = np.zeros(len(truth), bool)
            for d in range(len(det)):
                best, match = min(threshold, 1 - 1e-10), -1
                for g in range(len(truth)):
                    if not taken[g] and ious[d, g] >= best:
                        best, match = ious[d, g], g
                if match >= 0:
                    taken[match], tp[t, d] = True, True
        out.append((det_scores, tp, len(truth)))
    return out


def mean_average_precision(matches: list[list[tuple[np.ndarray, np.ndarray, int]]], images: np.ndarray) -> float:
    """COCO-style AP (101-point interpolated precision) averaged over classes and IoU thresholds, over the images
    `images` (indices into `matches`, repeats allowed); a class without true boxes there is left out."""
    values = []
    for c in range(len(matches[0]) if matches else 0):
        parts = [matches[i][c] for i in images]
        positives = sum(p[2] for p in parts)
        if positives == 0:
            continue
        scores = np.concatenate([p[0] for p in parts])
        if len(scores) == 0:  # nothing detected: AP 0 at every threshold
            values.extend([0.0] * parts[0][1].shape[0])
            continue
        order = np.argsort(-scores, kind="mergesort")
        tp_all = np.concatenate([p[1] for p in parts], axis=1)[:, order]
        for tp in tp_all:
            tps, fps = np.cumsum(tp), np.cumsum(~tp)
            recall = tps / positives
            precision = tps / np.maximum(tps + fps, np.spacing(1))
            precision = np.maximum.accumulate(precision[::-1])[::-1]  # the best precision at any higher recall
            at = np.searchsorted(recall, RECALL_POINTS, side="left")
            values.append(np.mean(np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)], 0.0)))
    return float(np.mean(values)) if values else float("nan")
