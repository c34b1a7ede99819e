"""Query-box localization (UP-DETR-style): given an image and an augmented crop of a random region of it,
predict the region's box (cx, cy, w, h, fractions of the image). Loss: L1 + generalised IoU."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mvlp_jax.data import transforms
from mvlp_jax.data import views as views_lib
from mvlp_jax.models.heads import BoxHead
from mvlp_jax.objectives.spec import LossFn, Spec, ViewInputs, check_patch_multiple
from mvlp_jax.runtime import figures, schema


def locate(model: nn.Module, images: jax.Array, queries: jax.Array, train: bool = True) -> jax.Array:
    """(image, augmented region of it) -> predicted normalised box (cx, cy, w, h) of the region; a `method`
    of `Pretrainer.apply`."""
    pooled = jnp.concatenate(
        [model.features(images, model.global_pooling, train), model.features(queries, model.global_pooling, train)],
        axis=-1,
    )
    return model.box_head(pooled).astype(jnp.float32)


def entries(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
    q = config.query_box.size
    return {"query": ((q, q, views_lib.channels(config)), np.float32), "box": ((4,), np.float32)}


def views(inputs: ViewInputs) -> dict[str, np.ndarray]:
    """A random region of the training crop, resized and jittered, and its box as fractions of the crop."""
    q = inputs.config.query_box
    query, box = views_lib.query_region(inputs.crop, q.size, tuple(q.scale), inputs.rng)
    return {"query": inputs.normalise(inputs.jitter(query)), "box": box}


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


def make(model: nn.Module, config: ml_collections.ConfigDict) -> LossFn:
    q = config.query_box

    def objective(params: Any, batch: dict, rng: jax.Array, context: dict) -> tuple[jax.Array, dict]:
        del context
        predicted = model.apply(
            {"params": params}, batch["image"], batch["query"], train=True, rngs={"dropout": rng}, method=locate
        )
        l1 = jnp.mean(jnp.sum(jnp.abs(predicted - batch["box"]), axis=-1))
        iou, giou = iou_and_giou(predicted, batch["box"])
        value = q.l1_weight * l1 + q.giou_weight * jnp.mean(1 - giou)
        return value, {"loss": value, "l1": l1, "mean_iou": jnp.mean(iou)}

    return objective


def pictures(painter: Any, params: Any, shown: Any) -> dict[str, np.ndarray]:
    """The query-box picture (pretrain/visualize.py's Painter draws it with a run's params on the shown images): a
    random region of each image (below it) located in its image, the true box red, the predicted blue."""
    config = painter.config
    q = config.query_box
    rng = np.random.default_rng(painter.seed)
    regions, boxes = zip(*[views_lib.query_region(img, q.size, tuple(q.scale), rng) for img in shown.pixels])
    queries = transforms.normalise(np.stack(regions), config.data.mean, config.data.std, views_lib.channels(config))
    find = painter.jitted(
        "query_box.locate", lambda p, x, r: painter.model.apply({"params": p}, x, r, train=False, method=locate)
    )
    predicted = np.asarray(find(params, jnp.asarray(shown.images), jnp.asarray(queries)))
    iou, _ = iou_and_giou(jnp.asarray(predicted), jnp.asarray(np.stack(boxes)))
    located = [
        {"image": figures.rgb(pixels), "boxes": [(true, "red"), (guess, "blue")], "title": f"IoU {float(v):.2f}"}
        for pixels, true, guess, v in zip(shown.pixels, boxes, predicted, np.asarray(iou))
    ]
    return {
        "query_box": figures.grid_figure(
            [located, [figures.rgb(r) for r in regions]],
            [],
            f"query-box localisation: the region (below) located in its image, true "
            f"box red, predicted blue; mean IoU {float(np.mean(iou)):.2f}",
        )
    }


# Its config keys (docs/config.md): key -> (default, check, description)
CONFIG_ROWS: schema.Table = {
    "query_box.size": (96, schema.POSITIVE, "Query box: the cropped region is resized to this many pixels."),
    "query_box.scale": ((0.05, 0.3), schema.CROP_SCALE, "Query box: area range of the region, of the training image."),
    "query_box.l1_weight": (5.0, schema.NON_NEGATIVE, "Query box: weight of the L1 loss on (cx, cy, w, h)."),
    "query_box.giou_weight": (2.0, schema.NON_NEGATIVE, "Query box: weight of the generalised-IoU loss."),
}


SPEC = Spec(
    name="query_box",
    make_loss=make,
    entries=entries,
    views=views,
    heads=lambda model, config, dtype: {"box_head": BoxHead()},
    init=lambda model, images, targets: locate(model, images, images, train=False),
    check=lambda config: check_patch_multiple(config, "query_box.size"),
    pictures=pictures,
    config_rows=CONFIG_ROWS,
)
