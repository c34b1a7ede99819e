"""Batch-wide image-text losses. Under `jax.jit` with a sharded batch the (B, B) similarity is formed
over the global batch, so every image sees every report of the step as a negative, on any mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mvlp_jax.models.norm import l2_normalise


def infonce(images: jax.Array, texts: jax.Array, log_temperature: jax.Array) -> jax.Array:
    """Symmetric CLIP loss on cosine similarities / temperature (matching pairs on the diagonal)."""
    return symmetric_cross_entropy(l2_normalise(images) @ l2_normalise(texts).T / jnp.exp(log_temperature))


def symmetric_cross_entropy(logits: jax.Array) -> jax.Array:
    """Cross-entropy of a (B, B) logit matrix whose matching pairs are on the diagonal, over rows and over columns,
    averaged."""
    labels = jnp.arange(logits.shape[0])
    return 0.5 * (
        optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    )


def sigmoid(images: jax.Array, texts: jax.Array, log_temperature: jax.Array, bias: jax.Array) -> jax.Array:
    """SigLIP: every pair an independent binary decision; summed over pairs, averaged over images."""
    logits = l2_normalise(images) @ l2_normalise(texts).T / jnp.exp(log_temperature) + bias
    signs = 2.0 * jnp.eye(logits.shape[0]) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]


def margin(images: jax.Array, texts: jax.Array, eps: float) -> jax.Array:
    """Pairwise margin contrastive loss on L2-normalised embeddings:
    1[i=j] d_ij^2 + 1[i!=j] max(0, eps - d_ij)^2, with matching and non-matching pairs averaged apart
    (so the B^2 - B negatives do not drown the B positives)."""
    a, b = l2_normalise(images), l2_normalise(texts)
    sq = jnp.maximum(jnp.sum(a**2, -1)[:, None] + jnp.sum(b**2, -1)[None, :] - 2 * a @ b.T, 0.0)
    d = jnp.sqrt(sq + 1e-12)
    eye = jnp.eye(sq.shape[0])
    n = sq.shape[0]
    positive = jnp.sum(eye * sq) / n
    negative = jnp.sum((1 - eye) * jnp.maximum(eps - d, 0.0) ** 2) / max(n * (n - 1), 1)
    return positive + negative


def retrieval_accuracy(images: jax.Array, texts: jax.Array) -> jax.Array:
    """Fraction of images whose most similar report in the batch is their own (a readable metric)."""
    sims = l2_normalise(images) @ l2_normalise(texts).T
    return jnp.mean(jnp.argmax(sims, axis=1) == jnp.arange(sims.shape[0]))
