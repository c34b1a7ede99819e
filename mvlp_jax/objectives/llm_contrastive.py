"""LLM-target contrastive objective: pooled, projected image embedding vs the frozen LLM's report vector."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mvlp_jax.models.heads import ProjectionHead
from mvlp_jax.objectives import contrastive_losses as losses
from mvlp_jax.objectives.spec import LossFn, SharedSpace, Spec, study_inputs
from mvlp_jax.runtime import schema


def heads(model: nn.Module, config: ml_collections.ConfigDict, dtype: Any) -> dict[str, Any]:
    c = config.contrastive
    embed_dim = c.embed_dim or model.target_dim
    if c.text_proj == "none" and embed_dim != model.target_dim:
        raise ValueError(
            f"contrastive.embed_dim={c.embed_dim} differs from the LLM hidden size "
            f"{model.target_dim}: set contrastive.text_proj to 'linear' or 'mlp'"
        )
    return {
        "image_proj": ProjectionHead(out_dim=embed_dim, kind=c.image_proj, dtype=dtype),
        "text_proj": (
            None if c.text_proj == "none" else ProjectionHead(out_dim=embed_dim, kind=c.text_proj, dtype=dtype)
        ),
        "log_temperature": model.param("log_temperature", nn.initializers.constant(jnp.log(c.temperature)), ()),
        "logit_bias": model.param("logit_bias", nn.initializers.constant(c.sigmoid_bias), ()),
    }


def embed_images(
    model: nn.Module,
    images: jax.Array,
    train: bool = True,
    view_type: jax.Array | None = None,
    view_mask: jax.Array | None = None,
) -> jax.Array:
    """Full (unmasked) image, or a study's views -> encoder -> pooling -> projection, float32 (B, embed_dim); a
    `method` of `Pretrainer.apply`."""
    return model.image_proj(model.pooled(images, train, view_type, view_mask)).astype(jnp.float32)


def embed_targets(model: nn.Module, targets: jax.Array) -> jax.Array:
    """Frozen LLM vectors through the optional trainable text projection, float32."""
    x = targets.astype(jnp.float32)
    return x if model.text_proj is None else model.text_proj(x).astype(jnp.float32)


def init(model: nn.Module, images: jax.Array, targets: jax.Array) -> None:
    embed_images(model, images, train=False)
    embed_targets(model, targets)


def make(model: nn.Module, config: ml_collections.ConfigDict) -> LossFn:
    kind, eps = config.contrastive.loss, config.contrastive.margin

    def objective(params: Any, batch: dict, rng: jax.Array, context: dict) -> tuple[jax.Array, dict]:
        del context  # train-state extras and step: unused here
        variables = {"params": params}
        rngs = {"dropout": jax.random.fold_in(rng, 0)}
        z_img = model.apply(
            variables, batch["image"], train=True, rngs=rngs, method=embed_images, **study_inputs(batch)
        )
        z_txt = model.apply(variables, batch["target"], method=embed_targets)
        log_t = params["log_temperature"]
        if kind == "infonce":
            loss = losses.infonce(z_img, z_txt, log_t)
        elif kind == "sigmoid":
            loss = losses.sigmoid(z_img, z_txt, log_t, params["logit_bias"])
        else:
            loss = losses.margin(z_img, z_txt, eps)
        metrics = {
            "loss": loss,
            "retrieval_acc": losses.retrieval_accuracy(z_img, z_txt),
            "temperature": jnp.exp(log_t),
        }
        return loss, metrics

    return objective


# Its config keys (docs/config.md): key -> (default, check, description)
CONFIG_ROWS: schema.Table = {
    "contrastive.loss": (
        "infonce",
        ("infonce", "sigmoid", "margin"),
        "Batch-wide loss between image and report embeddings (over the global batch).",
    ),
    "contrastive.target": ("mean", ("mean", "last"), "Which stored LLM vector is the target."),
    "contrastive.embed_dim": (
        0,
        schema.NON_NEGATIVE,
        "Shared embedding size; 0 = the LLM hidden size (needs no text proj).",
    ),
    "contrastive.image_proj": ("mlp", ("linear", "mlp"), "Projection after pooling."),
    "contrastive.text_proj": ("none", ("none", "linear", "mlp"), "Trainable projection of the frozen LLM vector."),
    "contrastive.temperature": (0.07, schema.POSITIVE, "Initial temperature (infonce, sigmoid); learnable."),
    "contrastive.sigmoid_bias": (-10.0, None, "Initial logit bias of the sigmoid loss; learnable."),
    "contrastive.margin": (
        1.0,
        schema.POSITIVE,
        "eps of the margin loss: non-matching pairs are pushed this far apart.",
    ),
}


SPEC = Spec(
    name="llm_contrastive",
    make_loss=make,
    needs_targets=True,
    heads=heads,
    init=init,
    shared_space=SharedSpace(images=embed_images, text=embed_targets),
    config_rows=CONFIG_ROWS,
)
