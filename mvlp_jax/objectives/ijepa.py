"""I-JEPA (Assran et al., 2023): from a large context block of an image, a narrow predictor predicts the latent
tokens that an EMA target encoder gives several target blocks of the same image. No pixels, no augmented pairs.

Per image (on the host, `views`): `num_targets` target blocks (area `target_scale` of the patch grid, aspect
`target_aspect`) and one context block (area `context_scale`, square) with the targets' patches removed. Shapes
are static here: the context keeps a random `context_tokens` share of the grid and each target block a random
`target_tokens` share (blocks too small are redrawn), where the paper keeps every image's count cut to the
batch's smallest. The ViT encodes the context patches alone (as MAE does); the windowed ViTDet cannot drop
patches from its windows, so it sees every other patch as its learned mask token (as SimMIM does).

The target encoder (`extra["ijepa_target"]`, outside the optimizer) reads the whole image; its patch tokens,
layer-normalised without affine, are the targets. The predictor (a transformer of `predictor_depth` blocks)
reads the context tokens with their positions and one mask token per target patch with its position, once per
target block, and the loss is the mean squared distance at the target patches (the paper's L2). The target
encoder follows the encoder by EMA, its momentum rising linearly from `momentum` to 1 over the run.

Collapse shows as targets that no longer differ between patches: `ijepa/target_std` (the per-feature standard
deviation over the batch's target tokens, -> 0 on collapse) is logged with the loss, as is the predictions'.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mvlp_jax import kernels
from mvlp_jax.models.transformer import Encoder, sincos_2d
from mvlp_jax.models.vit import variant
from mvlp_jax.models.vitdet import ViTDet
from mvlp_jax.objectives.spec import LossFn, Spec, ViewInputs
from mvlp_jax.runtime import figures, schema

TARGET = "ijepa_target"  # the train state's `extra` key of the EMA target encoder
REDRAWS = 100  # block draws before a configuration that cannot hold its token counts is refused


def grid_of(config: ml_collections.ConfigDict) -> tuple[int, int]:
    g = config.model.image_size // variant(config.model.variant)["patch_size"]
    return g, g


def token_counts(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(context tokens, tokens per target block) for the config's grid."""
    gh, gw = grid_of(config)
    j = config.ijepa
    return max(1, round(j.context_tokens * gh * gw)), max(1, round(j.target_tokens * gh * gw))


def sample_block(
    grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """A (gh, gw) bool block: area a uniform share of `scale` of the grid, height / width uniform in `aspect`, at
    a uniform position (I-JEPA's block sampler)."""
    gh, gw = grid
    area = rng.uniform(*scale) * gh * gw
    ratio = rng.uniform(*aspect)
    h = min(gh, max(1, round(math.sqrt(area * ratio))))
    w = min(gw, max(1, round(math.sqrt(area / ratio))))
    top, left = rng.integers(gh - h + 1), rng.integers(gw - w + 1)
    block = np.zeros(grid, bool)
    block[top : top + h, left : left + w] = True
    return block


def sample_blocks(
    grid: tuple[int, int], config: ml_collections.ConfigDict, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(context (gh, gw) bool: its block without the targets, target blocks [(gh, gw) bool]) of one image, drawn
    until each target block holds its scored tokens and the context its tokens."""
    j = config.ijepa
    k_context, k_target = token_counts(config)
    for _ in range(REDRAWS):
        blocks = [sample_block(grid, tuple(j.target_scale), tuple(j.target_aspect), rng) for _ in range(j.num_targets)]
        if min(b.sum() for b in blocks) < k_target:
            continue
        context = sample_block(grid, tuple(j.context_scale), (1.0, 1.0), rng) & ~np.any(blocks, axis=0)
        if context.sum() >= k_context:
            return context, blocks
    raise ValueError(
        f"ijepa: no draw in {REDRAWS} left {k_context} context tokens (ijepa.context_tokens={j.context_tokens}) "
        f"beside {j.num_targets} target blocks of >= {k_target} tokens (ijepa.target_tokens={j.target_tokens}) "
        f"on a {grid[0]}x{grid[1]} grid: lower them or the target scale"
    )


def sample_masks(
    grid: tuple[int, int], config: ml_collections.ConfigDict, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(context patch indices (Kc,), target patch indices (M, Kt)) of one image, indices into the flat grid: a
    random subset of each block of `sample_blocks`, of the configured size."""
    context, blocks = sample_blocks(grid, config, rng)
    k_context, k_target = token_counts(config)
    pick = lambda mask, k: np.sort(rng.choice(np.flatnonzero(mask), size=k, replace=False))
    return pick(context, k_context), np.stack([pick(b, k_target) for b in blocks])


def entries(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
    k_context, k_target = token_counts(config)
    return {
        "ijepa_context": ((k_context,), np.int32),
        "ijepa_targets": ((config.ijepa.num_targets, k_target), np.int32),
    }


def views(inputs: ViewInputs) -> dict[str, np.ndarray]:
    context, targets = sample_masks(grid_of(inputs.config), inputs.config, inputs.rng)
    return {"ijepa_context": context.astype(np.int32), "ijepa_targets": targets.astype(np.int32)}


class Predictor(nn.Module):
    """Context tokens (B, Kc, D) at `context_ids` (B, Kc) -> predicted target tokens (B, M, Kt, D) at
    `target_ids` (B, M, Kt); positions are fixed 2D sine-cosine embeddings of `grid`."""

    width: int
    depth: int
    num_heads: int
    out_width: int
    grid: tuple[int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, context: jax.Array, context_ids: jax.Array, target_ids: jax.Array, train: bool = False
    ) -> jax.Array:
        b, m, k_target = target_ids.shape
        pos = jnp.asarray(sincos_2d(*self.grid, self.width), self.dtype)
        dense = lambda features, name: nn.Dense(
            features, dtype=self.dtype, dot_general=kernels.dense_dot_general, name=name
        )
        x = dense(self.width, "embed")(context) + pos[context_ids]
        x = jnp.repeat(x, m, axis=0)  # (B * M, Kc, W): one sequence per target block
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.width))
        queries = mask_token.astype(self.dtype) + pos[target_ids.reshape(b * m, k_target)]
        x = jnp.concatenate([x, queries], axis=1)
        x = Encoder(
            depth=self.depth, num_heads=self.num_heads, mlp_dim=4 * self.width, dtype=self.dtype, name="blocks"
        )(x, train)
        return dense(self.out_width, "project")(x[:, -k_target:]).reshape(b, m, k_target, self.out_width)


def heads(model: nn.Module, config: ml_collections.ConfigDict, dtype: Any) -> dict[str, Any]:
    j = config.ijepa
    return {
        "ijepa_predictor": Predictor(
            width=j.predictor_width,
            depth=j.predictor_depth,
            num_heads=j.predictor_heads,
            out_width=variant(config.model.variant)["width"],
            grid=grid_of(config),
            dtype=dtype,
        )
    }


def patch_tokens(model: nn.Module, images: jax.Array, train: bool = False) -> jax.Array:
    """The encoder's patch tokens of whole images (B, N, D), float32, CLS left out; a `method` of the model."""
    tokens = model.encoder(images, train=train)
    return (tokens[:, 1:] if model.encoder.cls_token else tokens).astype(jnp.float32)


def context_tokens(model: nn.Module, images: jax.Array, context_ids: jax.Array, train: bool = False) -> jax.Array:
    """The encoder's tokens of the context patches (B, Kc, D), seeing nothing of the rest of the image."""
    if isinstance(model.encoder, ViTDet):
        n = (images.shape[1] // model.encoder.patch_size) * (images.shape[2] // model.encoder.patch_size)
        hidden = jnp.ones((images.shape[0], n), bool).at[jnp.arange(images.shape[0])[:, None], context_ids].set(False)
        tokens = model.encoder(images, token_mask=hidden, train=train)
        return jnp.take_along_axis(tokens, context_ids[..., None], axis=1)
    tokens = model.encoder(images, keep_ids=context_ids, train=train)
    return tokens[:, 1:] if model.encoder.cls_token else tokens


def predict(
    model: nn.Module, images: jax.Array, context_ids: jax.Array, target_ids: jax.Array, train: bool = True
) -> jax.Array:
    """Predicted target tokens (B, M, Kt, D), float32; a `method` of the model."""
    context = context_tokens(model, images, context_ids, train)
    return model.ijepa_predictor(context, context_ids, target_ids, train).astype(jnp.float32)


def targets(tokens: jax.Array, target_ids: jax.Array) -> jax.Array:
    """Layer-normalised (no affine) patch tokens (B, N, D) gathered at target_ids (B, M, Kt) -> (B, M, Kt, D)."""
    b, m, k = target_ids.shape
    normed = (tokens - tokens.mean(-1, keepdims=True)) * jax.lax.rsqrt(tokens.var(-1, keepdims=True) + 1e-6)
    return jnp.take_along_axis(normed, target_ids.reshape(b, m * k)[..., None], axis=1).reshape(b, m, k, -1)


def feature_std(x: jax.Array) -> jax.Array:
    """Mean over features of their standard deviation over every token of the batch (collapse -> 0)."""
    return jnp.mean(jnp.std(x.reshape(-1, x.shape[-1]), axis=0))


def make(model: nn.Module, config: ml_collections.ConfigDict) -> LossFn:
    del config

    def objective(params: Any, batch: dict, rng: jax.Array, context: dict) -> tuple[jax.Array, dict]:
        images, target_ids = batch["image"], batch["ijepa_targets"]
        target_params = {**params, "encoder": jax.lax.stop_gradient(context["extra"][TARGET])}
        tokens = model.apply({"params": target_params}, images, method=patch_tokens)
        wanted = jax.lax.stop_gradient(targets(tokens, target_ids))
        predicted = model.apply(
            {"params": params},
            images,
            batch["ijepa_context"],
            target_ids,
            rngs={"dropout": rng},
            method=predict,
        )
        loss = jnp.mean((predicted - wanted) ** 2)  # the paper's squared L2, per feature: ~1 at the start
        return loss, {"loss": loss, "target_std": feature_std(wanted), "prediction_std": feature_std(predicted)}

    return objective


def momentum(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """Linear from ijepa.momentum at step 0 to 1 at total_steps (the paper's schedule)."""
    m0 = config.ijepa.momentum
    return m0 + (1.0 - m0) * jnp.minimum(step, config.total_steps) / config.total_steps


def init_extra(params: Any, config: ml_collections.ConfigDict) -> dict:
    del config
    return {TARGET: params["encoder"]}  # the target encoder starts as the encoder


def update_extra(
    extra: dict, params: Any, metrics: dict, step: jax.Array, config: ml_collections.ConfigDict
) -> tuple[dict, dict]:
    """EMA of the (updated) encoder into the target encoder."""
    m = momentum(config, step)
    target = jax.tree.map(lambda t, s: m * t + (1 - m) * s, extra[TARGET], params["encoder"])
    return {**extra, TARGET: target}, metrics


def pictures(painter: Any, params: Any, shown: Any) -> dict[str, np.ndarray]:
    """What the predictor is asked (pretrain/visualize.py's Painter draws it on the shown images): the context it
    reads (the rest greyed out) and the target blocks it predicts (outlined), one draw per image."""
    del params  # the blocks are the objective's question, not the network's answer
    config, rng = painter.config, np.random.default_rng(painter.seed)
    grid = grid_of(config)
    panels = []
    for pixels in shown.pixels:
        context, blocks = sample_blocks(grid, config, rng)
        cell = pixels.shape[0] // grid[0]
        hidden = np.kron(~context, np.ones((cell, cell), bool))
        boxes = []
        for block, colour in zip(blocks, ("red", "blue", "orange", "magenta") * len(blocks)):
            rows, cols = np.flatnonzero(block.any(1)), np.flatnonzero(block.any(0))
            box = ((cols[0] + cols[-1] + 1) / 2, (rows[0] + rows[-1] + 1) / 2, len(cols), len(rows))
            boxes.append((tuple(v / g for v, g in zip(box, (grid[1], grid[0], grid[1], grid[0]))), colour))
        panels.append({"image": figures.rgb(pixels, hidden), "boxes": boxes})
    return {
        "ijepa_blocks": figures.grid_figure(
            [panels],
            [],
            f"I-JEPA: the context the encoder reads (rest greyed) and the {config.ijepa.num_targets} target "
            "blocks the predictor predicts (outlined)",
        )
    }


def check(config: ml_collections.ConfigDict) -> None:
    """Refuses a grid on which the block sampler cannot hold the token counts (tried once, on the host)."""
    sample_masks(grid_of(config), config, np.random.default_rng(0))
    if config.ijepa.predictor_width % config.ijepa.predictor_heads:
        raise ValueError(
            f"ijepa.predictor_width={config.ijepa.predictor_width} must be a multiple of "
            f"ijepa.predictor_heads={config.ijepa.predictor_heads}"
        )


SHARE = schema.Rule(lambda v: 0 < v <= 1, "must lie in (0, 1]")
ASPECT = schema.Rule(lambda v: len(v) == 2 and 0 < v[0] <= v[1], "must be (low, high) with 0 < low <= high")

# Its config keys (docs/config.md): key -> (default, check, description); the paper's values where it has one
CONFIG_ROWS: schema.Table = {
    "ijepa.num_targets": (4, schema.POSITIVE, "I-JEPA: target blocks per image."),
    "ijepa.target_scale": ((0.15, 0.2), schema.CROP_SCALE, "I-JEPA: area range of a target block, of the grid."),
    "ijepa.target_aspect": ((0.75, 1.5), ASPECT, "I-JEPA: height / width range of a target block."),
    "ijepa.context_scale": ((0.85, 1.0), schema.CROP_SCALE, "I-JEPA: area range of the (square) context block."),
    "ijepa.context_tokens": (
        0.25,
        SHARE,
        "I-JEPA: share of the grid's patches the context encoder reads (a random subset of the context block "
        "without the targets; draws with fewer are redrawn).",
    ),
    "ijepa.target_tokens": (
        0.1,
        SHARE,
        "I-JEPA: share of the grid's patches scored per target block (a random subset of the block).",
    ),
    "ijepa.predictor_width": (384, schema.POSITIVE, "I-JEPA: width of the predictor transformer."),
    "ijepa.predictor_depth": (6, schema.POSITIVE, "I-JEPA: blocks of the predictor transformer."),
    "ijepa.predictor_heads": (12, schema.POSITIVE, "I-JEPA: attention heads of the predictor."),
    "ijepa.momentum": (
        0.996,
        schema.UNIT_INTERVAL,
        "I-JEPA: EMA momentum of the target encoder at step 0, linear to 1 at the end.",
    ),
}


SPEC = Spec(
    name="ijepa",
    make_loss=make,
    entries=entries,
    views=views,
    heads=heads,
    init=lambda model, images, targets: predict(
        model,
        images,
        jnp.zeros((images.shape[0], 1), jnp.int32),
        jnp.zeros((images.shape[0], 1, 1), jnp.int32),
        train=False,
    ),
    init_extra=init_extra,
    update_extra=update_extra,
    check=check,
    pictures=pictures,
    config_rows=CONFIG_ROWS,
)
