"""Masked image modelling objective: MAE on the ViT, SimMIM on the windowed ViTDet."""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections

from mvlp_jax.models.pretrainer import Pretrainer


def make(model: Pretrainer, config: ml_collections.ConfigDict
         ) -> Callable[[Any, dict, jax.Array, dict], tuple[jax.Array, dict]]:
    del config

    def objective(params: Any, batch: dict, rng: jax.Array, context: dict) -> tuple[jax.Array, dict]:
        del context  # train-state extras and step: unused here
        rngs = {"masking": jax.random.fold_in(rng, 0), "dropout": jax.random.fold_in(rng, 1)}
        out = model.apply({"params": params}, batch["image"], train=True, rngs=rngs, method=Pretrainer.masked)
        return out["loss"], {"loss": out["loss"]}

    return objective
