"""Segmentation (`--config.evaluator=segmentation`), MGCA's protocol for ViTs as M-FLAG reports it: a SETR
progressive-upsampling head (models/dense_heads.py) learns the masks from the frozen patch tokens with
10 x focal(gamma 2) - log(soft Dice), AdamW; scored by Dice per test image at threshold 0.5 (an empty mask
predicted empty scores 1), averaged over all test images and, beside it, over those with a non-empty mask. A
test split whose masks are all empty is refused. The loop around it is task.py."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

from mvlp_jax.data import transforms
from mvlp_jax.evaluation.dense import metrics
from mvlp_jax.evaluation.dense import task as task_lib
from mvlp_jax.evaluation.dense.task import Truth
from mvlp_jax.models.dense_heads import DECODERS, ProgressiveUpsampling
from mvlp_jax.runtime import schema

FOCAL_WEIGHT, FOCAL_GAMMA = 10.0, 2.0


def loss_fn(logits: jax.Array, targets: dict[str, jax.Array]) -> jax.Array:
    """10 x focal(gamma 2) - log(soft Dice) over the batch (MGCA's segmentation loss); logits (B, H, W, 1)."""
    masks = targets["mask"]
    logits, t = logits.reshape(logits.shape[0], -1), masks.reshape(masks.shape[0], -1).astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(logits, t)
    focal = jnp.mean((1.0 - jnp.exp(-bce)) ** FOCAL_GAMMA * bce)
    p = jax.nn.sigmoid(logits)
    dice = (2.0 * jnp.sum(p * t) + 1.0) / (jnp.sum(p) + jnp.sum(t) + 1.0)
    return FOCAL_WEIGHT * focal - jnp.log(dice)


def masks_of(records: list[dict], size: int) -> np.ndarray:
    """The records' masks cropped and resized as their images are (nearest-neighbour), bool (N, size, size)."""
    return np.stack(
        [transforms.center_crop_resize(transforms.decode_png(r["mask"]), size, Image.NEAREST) > 0 for r in records]
    )


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


class Segmentation(task_lib.ImageTask):
    name, feature, metric, metric_label = "segmentation", "mask", "dice", "Dice"
    metrics = {"dice": "Dice", "dice_nonempty": "Dice, non-empty masks"}  # the SIIM convention beside it
    head_labels = {"upsampling": "SETR-PUP", "pyramid": "simple feature pyramid + upsampling"}
    build_hint = "build it with data_prep.build_dataset --mask_column=... (csv source)"

    def context(self, sources: dict, c: ml_collections.ConfigDict) -> dict:
        return {}

    def read(self, source, size: int, patch: int, context: dict) -> Truth:
        """Every record: its mask cropped and resized as the image is (nearest-neighbour), bool (N, size, size)."""
        records = [source[i] for i in range(len(source))]
        return {
            "records": np.arange(len(records)),
            "targets": {"mask": masks_of(records, size)},
            "patients": np.array([r["subject_id"].decode() for r in records]),
        }

    def head(self, patch: int, c: ml_collections.ConfigDict, context: dict, decoder: str) -> ProgressiveUpsampling:
        return ProgressiveUpsampling(patch_size=patch, channels=tuple(c.channels), decoder=decoder)

    def loss(self, outputs: jax.Array, targets: dict) -> jax.Array:
        return loss_fn(outputs, targets)

    def check(self, truth: Truth, where: str) -> None:
        empty = ~truth["targets"]["mask"].reshape(len(truth["patients"]), -1).any(1)
        if empty.all():
            raise ValueError(
                f"every mask of {where} is empty ({len(empty)} images): Dice would score an untrained "
                f"head's empty prediction 1. Check how the masks were read (data_prep.build_dataset "
                f"--mask_values; build_report.json counts empty masks per split)"
            )

    def score(self, outputs: np.ndarray, truth: Truth, patch: int, context: dict):
        """Dice per image averaged over all test images (an empty mask predicted empty scores 1), and over the
        images with a non-empty mask, so an empty-predicts-empty score never stands alone."""
        predicted = outputs[..., 0] > 0.0
        masks = truth["targets"]["mask"]
        dice = metrics.dice_per_image(predicted, masks)
        nonempty = masks.reshape(len(masks), -1).any(1)

        def over_nonempty(images: np.ndarray) -> float:
            kept = images[nonempty[images]]
            return float(np.mean(dice[kept])) if len(kept) else float("nan")

        return {"dice": lambda images: float(np.mean(dice[images])), "dice_nonempty": over_nonempty}, predicted

    def draw(self, ax: Any, image: np.ndarray, truth: Truth, predicted: np.ndarray, i: int) -> str:
        rgb = image.copy()
        true_mask = truth["targets"]["mask"][i]
        rgb[_outline(true_mask)] = (1.0, 0.1, 0.1)
        rgb[_outline(predicted[i])] = (0.2, 0.4, 1.0)
        ax.imshow(rgb)
        return f"Dice {metrics.dice_per_image(predicted[i : i + 1], true_mask[None])[0]:.2f}"


TASK = Segmentation()


ROWS: schema.Table = {
    "segmentation.epochs": (50, schema.POSITIVE, "Segmentation: passes over the training images (early stopping)."),
    "segmentation.batch_size": (16, schema.POSITIVE, "Segmentation: head training batch."),
    "segmentation.lr": (5e-4, schema.POSITIVE, "Segmentation: AdamW learning rate (MGCA's)."),
    "segmentation.weight_decay": (0.05, schema.NON_NEGATIVE, "Segmentation: AdamW decay."),
    "segmentation.patience": (
        10,
        schema.POSITIVE,
        "Segmentation: epochs without a lower validation loss before stopping.",
    ),
    "segmentation.channels": (
        (512, 256, 128, 64),
        schema.WIDTHS,
        "Segmentation: widths of the decoder's upsampling stages (SETR-PUP / MGCA's).",
    ),
    "segmentation.decoder": (
        "auto",
        ("auto",) + DECODERS,
        "Segmentation: from the stride-patch token grid to a quarter of the patch by SETR's "
        "'upsampling' stages or ViTDet's simple feature 'pyramid'; 'auto': upsampling for a ViT, "
        "the pyramid for a ViTDet. The pyramid's levels take the first width of channels.",
    ),
    "segmentation.plot_images": (6, schema.NON_NEGATIVE, "Segmentation: test images drawn in segmentation.png."),
}

EVALUATOR = task_lib.evaluator(
    TASK,
    ROWS,
    "a SETR progressive-upsampling head (or ViTDet's simple pyramid) on the "
    "encoder's patch tokens learns the dataset's masks (built with "
    "--mask_column), test Dice per image",
)
