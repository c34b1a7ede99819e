"""LLM-target contrastive objective: pooled, projected image embedding vs the frozen LLM's report vector."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.objectives import contrastive_losses as losses


def make(model: Pretrainer, config: ml_collections.ConfigDict
         ) -> Callable[[Any, dict, jax.Array, dict], tuple[jax.Array, dict]]:
    kind, eps = config.contrastive.loss, config.contrastive.margin

    def objective(params: Any, batch: dict, rng: jax.Array, context: dict) -> tuple[jax.Array, dict]:
        del context  # train-state extras and step: unused here
        variables = {"params": params}
        rngs = {"dropout": jax.random.fold_in(rng, 0)}
        z_img = model.apply(variables, batch["image"], train=True, rngs=rngs, method=Pretrainer.embed_images)
        z_txt = model.apply(variables, batch["target"], method=Pretrainer.embed_targets)
        log_t = params["log_temperature"]
        if kind == "infonce":
            loss = losses.infonce(z_img, z_txt, log_t)
        elif kind == "sigmoid":
            loss = losses.sigmoid(z_img, z_txt, log_t, params["logit_bias"])
        else:
            loss = losses.margin(z_img, z_txt, eps)
        metrics = {"loss": loss, "retrieval_acc": losses.retrieval_accuracy(z_img, z_txt),
                   "temperature": jnp.exp(log_t)}
        return loss, metrics

    return objective
