"""Segmentation in 3D (`--config.evaluator=volume_segmentation`): the masks of a ViT3D's volumes. A split's slices
become series (one per study id, ordered by `slice_position`, then image id: studies.volumes) and each series
windows of `depth` consecutive slices, `stride` apart (the last window ends at the series' last slice; a series
shorter than `depth` is one window, its last slice repeated). A head on the frozen token grid
(dense_heads.PlaneUpsampling: SETR's upsampling, shared by the tubelet planes) learns the windows' masks with
segmentation's loss; the test windows' logits are averaged where windows overlap, and each test series is scored
whole on its own slices: Dice over its voxels (the main metric: a mean over series) and Dice per slice with a
non-empty mask (a mean over those slices). The loop around it is task.py: label fractions, seeds, early stopping
on the validation series, patient-level intervals."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from mvlp_jax.data import studies
from mvlp_jax.evaluation import features
from mvlp_jax.evaluation.dense import metrics, segmentation
from mvlp_jax.evaluation.dense import task as task_lib
from mvlp_jax.evaluation.dense.task import Truth
from mvlp_jax.models.dense_heads import PlaneUpsampling
from mvlp_jax.runtime import schema


def window_starts(length: int, depth: int, stride: int) -> list[int]:
    """First slices of the windows of `depth` slices over a series of `length` (>= depth): every `stride`, and one
    ending at the last slice if those miss it."""
    starts = list(range(0, length - depth + 1, stride))
    return starts if starts[-1] + depth == length else starts + [length - depth]


def stitch(windows: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Windows (W, depth, ...) of one series at `starts` -> the series (length, ...), averaged where they
    overlap."""
    depth = windows.shape[1]
    length = int(starts.max()) + depth
    total, count = np.zeros((length, *windows.shape[2:]), np.float64), np.zeros(length)
    for window, start in zip(windows, starts):
        total[start : start + depth] += window
        count[start : start + depth] += 1
    return total / count.reshape(-1, *[1] * (windows.ndim - 2))


class VolumeSegmentation(segmentation.Segmentation):
    name, metric, metric_label, unit = "volume_segmentation", "dice", "Dice per volume", "windows"
    metrics = {"dice": "Dice per volume", "dice_slices": "Dice per slice with a mask"}  # means over series, slices
    head_labels = {"upsampling": "SETR-PUP per tubelet plane", "pyramid": "simple feature pyramid per tubelet plane"}
    build_hint = (
        "build it with data_prep.build_dataset --mask_column=... --study_column=SERIES "
        "[--slice_position_column=Z] (csv source)"
    )

    def context(self, sources: dict, c: ml_collections.ConfigDict) -> dict:
        if c.stride > c.depth:
            raise ValueError(
                f"volume_segmentation.stride={c.stride} is above depth={c.depth}: slices between windows would "
                f"go unscored"
            )
        return {"depth": c.depth, "stride": c.stride}

    def read(self, source, size: int, patch: int, context: dict) -> Truth:
        """Per window: its slices' records ("windows" (W, depth); a series shorter than depth is one window, its
        last slice repeated), its series, first slice and the series' length, the masks (W, depth, size, size),
        the patient; "records" and "shown" name the slice pictures draw (of the slices no earlier window holds,
        the one with the most mask)."""
        records = [source[i] for i in range(len(source))]
        depth, stride = context["depth"], context["stride"]
        series, _ = studies.volumes(
            [r["study_id"].decode() for r in records], [studies.slice_key(r) for r in records], depth=1
        )
        windows, of_series, starts, lengths = [], [], [], []
        for s, slices in enumerate(series):
            slices = slices[slices >= 0]
            padded = np.concatenate([slices, np.repeat(slices[-1:], max(0, depth - len(slices)))])
            for start in window_starts(len(padded), depth, stride):
                windows.append(padded[start : start + depth])
                of_series.append(s)
                starts.append(start)
                lengths.append(len(slices))
        windows, of_series, starts = np.stack(windows), np.asarray(of_series), np.asarray(starts)
        masks = segmentation.masks_of(records, size)[windows]
        area = masks.reshape(*windows.shape, -1).sum(-1)
        new = [
            0 if w == 0 or of_series[w - 1] != of_series[w] else starts[w - 1] + depth - starts[w]
            for w in range(len(windows))
        ]
        shown = np.array([first + int(area[w, first:].argmax()) for w, first in enumerate(new)])
        return {
            "records": windows[np.arange(len(windows)), shown],
            "shown": shown,
            "windows": windows,
            "series": of_series,
            "starts": starts,
            "lengths": np.asarray(lengths),
            "targets": {"mask": masks},
            "patients": np.array([records[int(w[0])]["subject_id"].decode() for w in windows]),
        }

    def inputs(self, source, truth: Truth, config: ml_collections.ConfigDict) -> features.Volumes:
        if config.model.encoder != "vit3d":
            raise ValueError(
                f"volume_segmentation reads volumes: this checkpoint's encoder is model.encoder="
                f"{config.model.encoder!r}, not 'vit3d'"
            )
        depth = truth["windows"].shape[1]
        if depth % config.model.tubelet:
            raise ValueError(
                f"volume_segmentation.depth={depth} is not a multiple of the checkpoint's model.tubelet="
                f"{config.model.tubelet}"
            )
        return features.Volumes(source, truth["windows"])

    def cases(self, truth: Truth) -> np.ndarray:
        """A patient per scored slice: a test split is judged by its slices (a volume is one of a few)."""
        length = dict(zip(truth["series"], zip(truth["lengths"], truth["patients"])))
        return np.array([patient for n, patient in length.values() for _ in range(n)])

    def head(self, patch: int, c: ml_collections.ConfigDict, context: dict, decoder: str) -> PlaneUpsampling:
        return PlaneUpsampling(depth=context["depth"], patch_size=patch, channels=tuple(c.channels), decoder=decoder)

    def score(self, outputs: np.ndarray, truth: Truth, patch: int, context: dict):
        """Each series' windows stitched (logits averaged) and thresholded at 0, its own slices only: Dice over its
        voxels, and Dice of each of its slices with a mask (pooled over the chosen series' slices); a statistic
        over windows counts each series once, whatever its windows."""
        masks, of_series, starts = truth["targets"]["mask"], truth["series"], truth["starts"]
        depth = masks.shape[1]
        predicted = np.zeros(masks.shape, bool)
        volume_dice, slice_dice = {}, {}  # series -> (sum, count)
        for s in np.unique(of_series):
            members = np.flatnonzero(of_series == s)
            length = int(truth["lengths"][members[0]])
            guess = stitch(outputs[members, ..., 0], starts[members])[:length] > 0.0
            true = stitch(masks[members].astype(np.float64), starts[members])[:length] > 0.5
            volume_dice[s] = (float(metrics.dice_per_image(guess[None], true[None])[0]), 1.0)
            nonempty = true.reshape(length, -1).any(1)
            slice_dice[s] = (
                float(metrics.dice_per_image(guess[nonempty], true[nonempty]).sum()),
                float(nonempty.sum()),
            )
            for w in members:
                part = guess[starts[w] : starts[w] + depth]
                predicted[w, : len(part)] = part
        windows_of = np.bincount(of_series)

        def pooled(per_series: dict) -> Any:
            """chosen windows -> sum / count over their series, each series once per draw of its windows."""
            sums, counts = (np.array([per_series[s][k] for s in of_series]) / windows_of[of_series] for k in (0, 1))

            def statistic(chosen: np.ndarray) -> float:
                count = counts[chosen].sum()
                return float(sums[chosen].sum() / count) if count > 0 else float("nan")

            return statistic

        return {"dice": pooled(volume_dice), "dice_slices": pooled(slice_dice)}, predicted

    def draw(self, ax: Any, image: np.ndarray, truth: Truth, predicted: np.ndarray, i: int) -> str:
        k = int(truth["shown"][i])
        one = {"targets": {"mask": truth["targets"]["mask"][i, k][None]}}
        return f"slice {truth['starts'][i] + k}: " + super().draw(ax, image, one, predicted[i, k][None], 0)


TASK = VolumeSegmentation()


def _volume_row(text: str) -> str:
    return "Volume " + text[0].lower() + text[1:].replace("images", "windows").replace("segmentation.png", "its png")


ROWS: schema.Table = {
    **{
        key.replace("segmentation.", "volume_segmentation."): (default, rule, _volume_row(text))
        for key, (default, rule, text) in segmentation.ROWS.items()
    },
    "volume_segmentation.depth": (
        16,
        schema.POSITIVE,
        "Volume segmentation: slices per window the encoder reads (a multiple of the checkpoint's model.tubelet).",
    ),
    "volume_segmentation.stride": (
        8,
        schema.POSITIVE,
        "Volume segmentation: slices between windows' starts; test windows' logits are averaged where they overlap.",
    ),
}

EVALUATOR = task_lib.evaluator(
    TASK,
    ROWS,
    "a head on a ViT3D's tubelet-token planes learns the masks of windows of consecutive slices of each series "
    "(built with --mask_column and --study_column); test Dice per volume, windows stitched",
)
