"""Masked image modelling objective: MAE on the ViT, SimMIM on the windowed ViTDet."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections

from mvlp_jax.objectives.spec import LossFn, Spec


def masked(model: nn.Module, images: jax.Array, train: bool = True) -> dict[str, Any]:
    """MAE (ViT) or SimMIM (ViTDet) on a batch: dict with 'loss' and the reconstruction."""
    return model.masked_model(images, train=train)


def make(model: nn.Module, config: ml_collections.ConfigDict) -> LossFn:
    del config

    def objective(params: Any, batch: dict, rng: jax.Array, context: dict) -> tuple[jax.Array, dict]:
        del context  # train-state extras and step: unused here
        rngs = {"masking": jax.random.fold_in(rng, 0), "dropout": jax.random.fold_in(rng, 1)}
        out = model.apply({"params": params}, batch["image"], train=True, rngs=rngs, method=masked)
        return out["loss"], {"loss": out["loss"]}

    return objective


SPEC = Spec(name="mae", make_loss=make, init=lambda model, images, targets: masked(model, images, train=False))
