"""M-FLAG: align the projected image embedding with the (projected) frozen LLM vector, and keep the image
features before projection decorrelated (orthogonality loss), so they do not collapse onto the frozen
text space."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mvlp_jax.models.heads import ProjectionHead
from mvlp_jax.models.norm import l2_normalise
from mvlp_jax.objectives.spec import LossFn, SharedSpace, Spec, study_inputs
from mvlp_jax.runtime import schema


def heads(model: nn.Module, config: ml_collections.ConfigDict, dtype: Any) -> dict[str, Any]:
    del model, dtype  # the heads run in float32 with batch statistics
    f = config.mflag
    return {
        "mflag_image_proj": ProjectionHead(
            out_dim=f.embed_dim, kind="mlp", hidden_dim=f.hidden_dim, norm="batch", out_norm=True
        ),
        "mflag_text_proj": ProjectionHead(out_dim=f.embed_dim, kind="mlp", hidden_dim=f.hidden_dim, norm="batch"),
    }


def pooled(
    model: nn.Module,
    images: jax.Array,
    train: bool = True,
    view_type: jax.Array | None = None,
    view_mask: jax.Array | None = None,
) -> jax.Array:
    """Pooled image (or study) features before projection, float32; what the orthogonality loss decorrelates."""
    return model.pooled(images, train, view_type, view_mask)


def project_images(model: nn.Module, features: jax.Array) -> jax.Array:
    return model.mflag_image_proj(features)


def project_targets(model: nn.Module, targets: jax.Array) -> jax.Array:
    return model.mflag_text_proj(targets.astype(jnp.float32))


def embed(
    model: nn.Module,
    images: jax.Array,
    targets: jax.Array,
    train: bool = True,
    view_type: jax.Array | None = None,
    view_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(pooled image features before projection, projected image, projected text), float32; a `method` of
    `Pretrainer.apply`."""
    features = pooled(model, images, train, view_type, view_mask)
    return features, project_images(model, features), project_targets(model, targets)


def alignment(z_img: jax.Array, z_txt: jax.Array) -> jax.Array:
    """Mean over the batch of 2 - 2 cos(z_img, z_txt) (symmetric in its arguments)."""
    return jnp.mean(2.0 - 2.0 * jnp.sum(l2_normalise(z_img) * l2_normalise(z_txt), axis=-1))


def orthogonality(features: jax.Array, off_diagonal_weight: float) -> jax.Array:
    """C = X^T X / N over the (global) batch; 0.5 * [sum_i (C_ii - 1)^2 + lambda * sum_{i != j} C_ij^2]."""
    x = features.astype(jnp.float32)
    c = x.T @ x / x.shape[0]
    diagonal = jnp.diagonal(c)
    on = jnp.sum((diagonal - 1.0) ** 2)
    off = jnp.sum(c**2) - jnp.sum(diagonal**2)
    return 0.5 * (on + off_diagonal_weight * off)


def make(model: nn.Module, config: ml_collections.ConfigDict) -> LossFn:
    f = config.mflag

    def objective(params: Any, batch: dict, rng: jax.Array, context: dict) -> tuple[jax.Array, dict]:
        del context  # train-state extras and step: unused here
        features, z_img, z_txt = model.apply(
            {"params": params},
            batch["image"],
            batch["target"],
            train=True,
            rngs={"dropout": jax.random.fold_in(rng, 0)},
            method=embed,
            **study_inputs(batch),
        )
        align = alignment(z_img, z_txt)
        ortho = orthogonality(features, f.ortho_lambda)
        loss = align + f.ortho_weight * ortho
        return loss, {"loss": loss, "alignment": align, "orthogonality": ortho}

    return objective


# Both projections normalise by batch statistics: evaluation applies the image head to the whole evaluated set
# at once, and the text head with the statistics of a set of reports (mvlp_jax/evaluation/shared_space.py).
# Its config keys (docs/config.md): key -> (default, check, description)
CONFIG_ROWS: schema.Table = {
    "mflag.embed_dim": (512, schema.POSITIVE, "M-FLAG: size of the aligned image/text embeddings."),
    "mflag.hidden_dim": (2048, schema.POSITIVE, "M-FLAG: hidden width of the projection MLPs (with batch norm)."),
    "mflag.ortho_weight": (
        1.0,
        schema.NON_NEGATIVE,
        "M-FLAG: weight of the orthogonality loss beside the alignment loss.",
    ),
    "mflag.ortho_lambda": (
        0.0051,
        schema.NON_NEGATIVE,
        "M-FLAG: weight of the off-diagonal terms in the orthogonality loss.",
    ),
}


SPEC = Spec(
    name="mflag",
    make_loss=make,
    needs_targets=True,
    heads=heads,
    init=lambda model, images, targets: embed(model, images, targets, train=False),
    shared_space=SharedSpace(images=pooled, text=project_targets, image_head=project_images),
    config_rows=CONFIG_ROWS,
)
