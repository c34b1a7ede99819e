"""Detection (`--config.evaluator=detection`): a CenterNet head (models/dense_heads.py) on the patch tokens brought
to a quarter of the patch (SETR upsampling or the simple feature pyramid) learns per-class centre heatmaps
(penalty-reduced focal loss around Gaussian peaks), box sizes and centre offsets (L1 at the centres, weights 0.1
and 1); its 100 highest 3x3 peaks per test image are scored by mean average precision over IoU 0.40 to 0.75 in
steps of 0.05 (the RSNA mAP M-FLAG reports; COCO's 101-point AP, metrics.py). The loop around it is
task.py."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mvlp_jax.data import transforms
from mvlp_jax.evaluation.dense import metrics
from mvlp_jax.evaluation.dense import task as task_lib
from mvlp_jax.evaluation.dense.task import Truth
from mvlp_jax.models.dense_heads import DECODERS, CenterNet
from mvlp_jax.runtime import schema

SIZE_WEIGHT, OFFSET_WEIGHT, MIN_OVERLAP = 0.1, 1.0, 0.7


def crop_boxes(boxes: np.ndarray, height: int, width: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4) in stored-image pixels -> (the boxes in pixels of the evaluation view (centred square resized
    to `size`), clipped to it, without those left thinner than a pixel; which of the N were kept)."""
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    out = np.clip((boxes.reshape(-1, 4) - np.array([left, top, left, top])) * (size / side), 0, size)
    kept = (out[:, 2] - out[:, 0] >= 1) & (out[:, 3] - out[:, 1] >= 1)
    return out[kept], kept


def gaussian_radius(height: float, width: float, min_overlap: float = MIN_OVERLAP) -> float:
    """CornerNet / CenterNet's radius: the largest shift of the box's corners that keeps IoU >= min_overlap
    with the true box (the smallest of the three cases' quadratic roots)."""
    hw, s, o = height * width, height + width, min_overlap
    r1 = (s - math.sqrt(s**2 - 4 * hw * (1 - o) / (1 + o))) / 2  # one corner inside, one outside
    r2 = (2 * s - math.sqrt(4 * s**2 - 16 * (1 - o) * hw)) / 8  # both corners inside
    r3 = (2 * o * s + math.sqrt(4 * o**2 * s**2 + 16 * o * (1 - o) * hw)) / (8 * o)  # both outside
    return min(r1, r2, r3)


def targets(
    boxes: list[np.ndarray], labels: list[np.ndarray], size: int, stride: int, classes: int
) -> dict[str, np.ndarray]:
    """CenterNet training targets at `size // stride` cells: heatmap (N, S, S, classes) with a Gaussian peak of
    1 at each centre cell; per image up to K boxes (the most any image has): size and offset in cells, flat
    centre index and a mask of the real ones."""
    cells = size // stride
    k = max(1, max(len(b) for b in boxes))
    out = {
        "heatmap": np.zeros((len(boxes), cells, cells, classes), np.float32),
        "size": np.zeros((len(boxes), k, 2), np.float32),
        "offset": np.zeros((len(boxes), k, 2), np.float32),
        "index": np.zeros((len(boxes), k), np.int32),
        "box_mask": np.zeros((len(boxes), k), np.float32),
    }
    ys, xs = np.mgrid[0:cells, 0:cells]
    for n, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
        for j, (box, label) in enumerate(zip(image_boxes / stride, image_labels)):
            w, h = box[2] - box[0], box[3] - box[1]
            center = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
            cx, cy = np.minimum(center.astype(int), cells - 1)
            sigma = (2 * max(0, int(gaussian_radius(h, w))) + 1) / 6
            peak = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
            out["heatmap"][n, :, :, label] = np.maximum(out["heatmap"][n, :, :, label], peak)
            out["size"][n, j], out["offset"][n, j] = (w, h), center - (cx, cy)
            out["index"][n, j], out["box_mask"][n, j] = cy * cells + cx, 1.0
    return out


def loss_fn(outputs: tuple[jax.Array, jax.Array, jax.Array], t: dict[str, jax.Array]) -> jax.Array:
    """Penalty-reduced focal loss on the heatmap (alpha 2, beta 4) + 0.1 L1 on sizes + L1 on offsets at the
    true centres, each normalised by the number of boxes (CenterNet's)."""
    logits, size, offset = outputs
    p = jnp.clip(jax.nn.sigmoid(logits.astype(jnp.float32)), 1e-4, 1 - 1e-4)
    positive = (t["heatmap"] >= 1.0 - 1e-6).astype(jnp.float32)
    boxes = jnp.maximum(jnp.sum(t["box_mask"]), 1.0)
    focal = -(
        jnp.sum(jnp.log(p) * (1 - p) ** 2 * positive)
        + jnp.sum(jnp.log(1 - p) * p**2 * (1 - t["heatmap"]) ** 4 * (1 - positive))
    )
    at_centres = lambda x: jnp.take_along_axis(x.reshape(x.shape[0], -1, 2), t["index"][..., None], axis=1)
    l1 = lambda x, y: jnp.sum(jnp.abs(at_centres(x) - y) * t["box_mask"][..., None]) / (2 * boxes)
    return (
        focal / jnp.maximum(jnp.sum(positive), 1.0)
        + SIZE_WEIGHT * l1(size, t["size"])
        + OFFSET_WEIGHT * l1(offset, t["offset"])
    )


def decode(
    outputs: tuple[np.ndarray, np.ndarray, np.ndarray], stride: int, top: int = metrics.MAX_DETECTIONS
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image (boxes (k, 4) in pixels, scores, labels) of the `top` highest local maxima (3x3) of the
    heatmap."""
    logits, size, offset = outputs
    heat = np.asarray(jax.nn.sigmoid(jnp.asarray(logits, jnp.float32)))
    pooled = np.asarray(
        jax.lax.reduce_window(jnp.asarray(heat), -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
    )  # same dtype as `heat`: a peak equals its own maximum
    peaks = np.where(heat == pooled, heat, 0.0)
    out = []
    for n in range(len(heat)):
        flat = peaks[n].reshape(-1)
        best = np.argsort(-flat, kind="mergesort")[:top]
        best = best[flat[best] > 0]
        y, x, label = np.unravel_index(best, peaks[n].shape)
        centre = np.stack([x, y], axis=1) + offset[n, y, x]
        half = np.maximum(size[n, y, x], 0.0) / 2
        out.append((np.concatenate([centre - half, centre + half], axis=1) * stride, flat[best], label))
    return out


class Detection(task_lib.ImageTask):
    name, feature, metric, metric_label = "detection", "boxes", "map", "mAP@[.40:.75]"
    metrics = {"map": "mAP@[.40:.75]"}
    head_labels = {"upsampling": "CenterNet", "pyramid": "simple feature pyramid + CenterNet"}
    build_hint = "build it with data_prep.build_dataset --boxes_csv=... (csv source)"

    def context(self, sources: dict, c: ml_collections.ConfigDict) -> dict:
        """Class names (every box label of every split, sorted) and which images count."""
        names = {
            label.decode()
            for source in sources.values()
            for i in range(len(source))
            for label in source[i]["box_labels"]
        }
        if not names:
            raise ValueError("the dataset's splits hold no boxes")
        return {"classes": sorted(names), "images": c.images}

    def read(self, source, size: int, patch: int, context: dict) -> Truth:
        """Boxes and labels in the evaluation view, and CenterNet targets, of the records with a box
        (detection.images='boxed': a record without one may be unannotated rather than normal) or of all."""
        index = {name: i for i, name in enumerate(context["classes"])}
        records, boxes, labels, patients = [], [], [], []
        for i in range(len(source)):
            r = source[i]
            if not len(r["boxes"]) and context["images"] == "boxed":
                continue
            height, width = transforms.png_shape(r["image"])
            visible, kept = crop_boxes(np.asarray(r["boxes"], np.float64), height, width, size)
            records.append(i)
            boxes.append(visible)
            labels.append(np.asarray([index[x.decode()] for x in r["box_labels"]], np.int64)[kept])
            patients.append(r["subject_id"].decode())
        if not records:
            raise ValueError("no image of this split has a box")
        stride = CenterNet(patch_size=patch).stride()
        return {
            "records": np.asarray(records),
            "boxes": boxes,
            "labels": labels,
            "patients": np.asarray(patients),
            "targets": targets(boxes, labels, size, stride, len(index)),
        }

    def head(self, patch: int, c: ml_collections.ConfigDict, context: dict, decoder: str) -> CenterNet:
        return CenterNet(patch_size=patch, classes=len(context["classes"]), channels=tuple(c.channels), decoder=decoder)

    def loss(self, outputs: Any, targets: dict) -> jax.Array:
        return loss_fn(outputs, targets)

    def score(self, outputs: Any, truth: Truth, patch: int, context: dict):
        stride = CenterNet(patch_size=patch).stride()
        detections = decode(outputs, stride)
        matches = [
            metrics.match_image(b, s, lab, tb, tl, len(context["classes"]))
            for (b, s, lab), tb, tl in zip(detections, truth["boxes"], truth["labels"])
        ]
        return {"map": lambda images: metrics.mean_average_precision(matches, images)}, detections

    def check(self, truth: Truth, where: str) -> None:
        if not any(len(b) for b in truth["boxes"]):
            raise ValueError(
                f"no test image of {where} has a box ({len(truth['boxes'])} images): there is nothing "
                f"to detect, and mAP is not defined"
            )

    def draw(self, ax: Any, image: np.ndarray, truth: Truth, detections: Any, i: int) -> str:
        from matplotlib.patches import Rectangle

        ax.imshow(image)
        boxes, scores, _ = detections[i]
        shown = boxes[: max(1, len(truth["boxes"][i]))]  # as many of the best detections as true boxes
        for colour, drawn in (((1.0, 0.1, 0.1), truth["boxes"][i]), ((0.2, 0.4, 1.0), shown)):
            for x0, y0, x1, y1 in drawn:
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1))
        return f"best score {scores[0]:.2f}" if len(scores) else "no detection"


TASK = Detection()


ROWS: schema.Table = {
    "detection.epochs": (80, schema.POSITIVE, "Detection: passes over the training images (early stopping)."),
    "detection.batch_size": (16, schema.POSITIVE, "Detection: head training batch."),
    "detection.lr": (5e-4, schema.POSITIVE, "Detection: AdamW learning rate."),
    "detection.weight_decay": (0.05, schema.NON_NEGATIVE, "Detection: AdamW decay."),
    "detection.patience": (15, schema.POSITIVE, "Detection: epochs without a lower validation loss before stopping."),
    "detection.channels": (
        (256, 128),
        schema.WIDTHS,
        "Detection: widths of the two upsampling stages before the CenterNet branches (the "
        "pyramid's levels take the first).",
    ),
    "detection.decoder": (
        "auto",
        ("auto",) + DECODERS,
        "Detection: as segmentation.decoder, before the CenterNet branches.",
    ),
    "detection.images": (
        "boxed",
        ("boxed", "all"),
        "Detection: images with at least one box (an image without one may be unannotated, as most "
        "of NIH's), or every image (a box-free image then counts as normal: false alarms on it "
        "count).",
    ),
    "detection.plot_images": (6, schema.NON_NEGATIVE, "Detection: test images drawn in detection.png."),
}

EVALUATOR = task_lib.evaluator(
    TASK, ROWS, "a CenterNet head learns the dataset's boxes (--boxes_csv), test mAP over IoU 0.40:0.75"
)
