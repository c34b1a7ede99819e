"""Masked image modelling objective: MAE on the ViT, SimMIM on the windowed ViTDet."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections

from mvlp_jax.objectives.spec import LossFn, Spec, study_inputs


def masked(
    model: nn.Module,
    images: jax.Array,
    train: bool = True,
    view_type: jax.Array | None = None,
    view_mask: jax.Array | None = None,
) -> dict[str, Any]:
    """MAE (ViT), SimMIM (ViTDet) or MAE in 3D (ViT3D's volumes) on a batch: dict with 'loss' and the
    reconstruction. A study's views (B, V, H, W, C) are masked and reconstructed one by one; padded views count
    for nothing."""
    del view_type  # each view is reconstructed from its own visible patches
    if images.ndim == 5 and not getattr(model.encoder, "volumetric", False):
        present = None if view_mask is None else view_mask.reshape(-1)
        return model.masked_model(images.reshape(-1, *images.shape[2:]), train=train, present=present)
    return model.masked_model(images, train=train)


def make(model: nn.Module, config: ml_collections.ConfigDict) -> LossFn:
    del config

    def objective(params: Any, batch: dict, rng: jax.Array, context: dict) -> tuple[jax.Array, dict]:
        del context  # train-state extras and step: unused here
        rngs = {"masking": jax.random.fold_in(rng, 0), "dropout": jax.random.fold_in(rng, 1)}
        out = model.apply(
            {"params": params}, batch["image"], train=True, rngs=rngs, method=masked, **study_inputs(batch)
        )
        return out["loss"], {"loss": out["loss"]}

    return objective


SPEC = Spec(name="mae", make_loss=make, init=lambda model, images, targets: masked(model, images, train=False))
