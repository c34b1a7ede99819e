"""M-FLAG: align the projected image embedding with the (projected) frozen LLM vector, and keep the image
features before projection decorrelated (orthogonality loss), so they do not collapse onto the frozen
text space."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from mvlp_jax.models.pretrainer import Pretrainer


def alignment(z_img: jax.Array, z_txt: jax.Array) -> jax.Array:
    """Mean over the batch of 2 - 2 cos(z_img, z_txt) (symmetric in its arguments)."""
    unit = lambda z: z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-6)
    return jnp.mean(2.0 - 2.0 * jnp.sum(unit(z_img) * unit(z_txt), axis=-1))


def orthogonality(features: jax.Array, off_diagonal_weight: float) -> jax.Array:
    """C = X^T X / N over the (global) batch; 0.5 * [sum_i (C_ii - 1)^2 + lambda * sum_{i != j} C_ij^2]."""
    x = features.astype(jnp.float32)
    c = x.T @ x / x.shape[0]
    diagonal = jnp.diagonal(c)
    on = jnp.sum((diagonal - 1.0) ** 2)
    off = jnp.sum(c ** 2) - jnp.sum(diagonal ** 2)
    return 0.5 * (on + off_diagonal_weight * off)


def make(model: Pretrainer, config: ml_collections.ConfigDict
         ) -> Callable[[Any, dict, jax.Array, dict], tuple[jax.Array, dict]]:
    f = config.mflag

    def objective(params: Any, batch: dict, rng: jax.Array, context: dict) -> tuple[jax.Array, dict]:
        del context  # train-state extras and step: unused here
        features, z_img, z_txt = model.apply({"params": params}, batch["image"], batch["target"], train=True,
                                             rngs={"dropout": jax.random.fold_in(rng, 0)},
                                             method=Pretrainer.mflag_embed)
        align = alignment(z_img, z_txt)
        ortho = orthogonality(features, f.ortho_lambda)
        loss = align + f.ortho_weight * ortho
        return loss, {"loss": loss, "alignment": align, "orthogonality": ortho}

    return objective
