"""Query-box localization (UP-DETR-style): given an image and an augmented crop of a random region of it,
predict the region's box (cx, cy, w, h, fractions of the image). Loss: L1 + generalised IoU."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from mvlp_jax.models.pretrainer import Pretrainer


def corners(box: jax.Array) -> jax.Array:
    """(..., 4) cx, cy, w, h -> x0, y0, x1, y1."""
    cx, cy, w, h = jnp.moveaxis(box, -1, 0)
    return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def iou_and_giou(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """IoU and generalised IoU (Rezatofighi et al.) of matching (cx, cy, w, h) boxes, per box."""
    a, b = corners(a), corners(b)
    area = lambda c: jnp.clip(c[..., 2] - c[..., 0], 0) * jnp.clip(c[..., 3] - c[..., 1], 0)
    inter_lo, inter_hi = jnp.maximum(a[..., :2], b[..., :2]), jnp.minimum(a[..., 2:], b[..., 2:])
    inter = jnp.prod(jnp.clip(inter_hi - inter_lo, 0), axis=-1)
    union = area(a) + area(b) - inter
    iou = inter / jnp.maximum(union, 1e-9)
    hull = jnp.prod(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), axis=-1)
    return iou, iou - (hull - union) / jnp.maximum(hull, 1e-9)


def make(model: Pretrainer, config: ml_collections.ConfigDict) -> Callable:
    q = config.query_box

    def objective(params: Any, batch: dict, rng: jax.Array, context: dict) -> tuple[jax.Array, dict]:
        del context
        predicted = model.apply({"params": params}, batch["image"], batch["query"], train=True,
                                rngs={"dropout": rng}, method=Pretrainer.locate)
        l1 = jnp.mean(jnp.sum(jnp.abs(predicted - batch["box"]), axis=-1))
        iou, giou = iou_and_giou(predicted, batch["box"])
        value = q.l1_weight * l1 + q.giou_weight * jnp.mean(1 - giou)
        return value, {"loss": value, "l1": l1, "mean_iou": jnp.mean(iou)}

    return objective
