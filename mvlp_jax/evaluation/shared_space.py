"""A run's image-text space for evaluation (retrieval, zero-shot): which objective declares it, and how evaluated
images and texts are embedded into it.

Heads trained with batch statistics (M-FLAG's BatchStatNorm projections) are evaluated with the statistics of a
whole set instead of a batch's, so an item's embedding never depends on how the set was cut into batches: the
image head normalises over every evaluated image (label-free, as test-time batch-norm adaptation does), the text
head over the evaluated reports or, for prompts, over a reference set of the run's training reports.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mvlp_jax.evaluation import features
from mvlp_jax.objectives import registry
from mvlp_jax.objectives.spec import SharedSpace
from mvlp_jax.pretrain import encoder as encoder_lib


def resolve(encoder: encoder_lib.Encoder) -> SharedSpace:
    """The run's image-text space, or a ValueError naming what the run was trained with."""
    specs = [s for s in registry.configured(encoder.config) if s.shared_space is not None]
    if not specs or not encoder.model.target_dim:
        raise ValueError(
            f"{encoder.name} was trained with {', '.join(sorted(encoder.config.objectives))}: none of "
            f"its objectives declares an image-report space to evaluate in (those that do: "
            f"{', '.join(n for n, s in registry.SPECS.items() if s.shared_space is not None)})"
        )
    return specs[0].shared_space


def embed_images(
    encoder: encoder_lib.Encoder,
    space: SharedSpace,
    source,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    desc: str,
) -> np.ndarray:
    """(N, E) float32 embeddings of every record of `source`; the image head, if any, over all N at once."""
    forward = lambda p, x: encoder.model.apply({"params": p}, x, train=False, method=space.images)
    out = features.apply_to_split(forward, encoder.params, source, encoder.config, config.batch_size, mesh, desc)
    return image_head_over_set(encoder, space, out)


def image_head_over_set(encoder: encoder_lib.Encoder, space: SharedSpace, pooled: np.ndarray) -> np.ndarray:
    """The space's image head (if any) over a whole set of `space.images` outputs at once, float32."""
    if space.image_head is None:
        return np.asarray(pooled, np.float32)
    head = jax.jit(lambda p, x: encoder.model.apply({"params": p}, x, method=space.image_head))
    return np.asarray(head(encoder.params, jnp.asarray(pooled)), np.float32)


def embed_texts(
    encoder: encoder_lib.Encoder,
    space: SharedSpace,
    vectors: np.ndarray,
    reference: Callable[[], np.ndarray] | None = None,
) -> np.ndarray:
    """(T, E) float32 embeddings of stored-style LLM vectors. A head with set statistics normalises with those
    of `reference()` (called only then), or of `vectors` themselves when no reference is given."""
    model = encoder.model
    record = jax.jit(lambda p, x: model.apply({"params": p}, x, method=space.text, mutable=["set_stats"]))
    out, recorded = record(encoder.params, jnp.asarray(vectors, jnp.float32))
    if not recorded.get("set_stats") or reference is None:
        return np.asarray(out, np.float32)
    _, stats = record(encoder.params, jnp.asarray(reference(), jnp.float32))
    fixed = jax.jit(lambda p, s, x: model.apply({"params": p, **s}, x, method=space.text))
    return np.asarray(fixed(encoder.params, stats, jnp.asarray(vectors, jnp.float32)), np.float32)
