"""AdamW with linear warmup and cosine decay, global-norm clipping, and no decay where it hurts."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

DECAYED_LEAVES = ("kernel", "last_v")  # decay only matrices; norms, biases, embeddings, tokens are exempt


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Peak lr scaled by global batch / 256 (the MAE convention), warmup then cosine to min_lr."""
    o = config.optim
    peak = o.lr * config.data.batch_size / 256
    warmup = min(o.warmup_steps, config.total_steps)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(config.total_steps, warmup + 1), o.min_lr)


def decay_mask(params: Any) -> Any:
    """True for weight matrices only (leaf names in DECAYED_LEAVES)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) in DECAYED_LEAVES, params)


def make(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = config.optim
    adamw = optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm else adamw
