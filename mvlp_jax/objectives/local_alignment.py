"""Local alignment of image regions with report words (GLoRIA's idea, which MGCA's token-level alignment shares), on
the frozen LLM's per-token states of each report (the precompute job's --store_tokens) instead of a trained text
encoder.

Each report word attends over the image's patch tokens (one softmax over regions of `word_temp` x cosine) and is
compared with what it attended to; the report-image similarity aggregates its real words' scores by a
log-sum-exp (sharpness `aggregate_temp`), so the words that find their region weigh most and padding never counts.
A symmetric cross-entropy over the global batch (x `logit_scale`), reports -> images and images -> reports,
trains it; the global losses (llm_contrastive, mae) run beside it as other objectives. Patch tokens and token
states go through their own trainable projections (the token states after a LayerNorm: an LLM's hidden states
carry a few very large features) to `embed_dim`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mvlp_jax import kernels
from mvlp_jax.data import report_tokens, targets
from mvlp_jax.models.norm import l2_normalise
from mvlp_jax.models.vit import variant
from mvlp_jax.objectives.contrastive_losses import symmetric_cross_entropy
from mvlp_jax.objectives.spec import LossFn, Spec
from mvlp_jax.runtime import figures, schema


def heads(model: nn.Module, config: ml_collections.ConfigDict, dtype: Any) -> dict[str, Any]:
    width = config.local_alignment.embed_dim
    dense = lambda name: nn.Dense(width, dtype=dtype, dot_general=kernels.dense_dot_general, name=name)
    return {
        "local_image_proj": dense("local_image_proj"),
        "local_text_norm": nn.LayerNorm(dtype=dtype, name="local_text_norm"),
        "local_text_proj": dense("local_text_proj"),
    }


def embed(model: nn.Module, images: jax.Array, tokens: jax.Array, train: bool = True) -> tuple[jax.Array, jax.Array]:
    """(regions (B, N, E), words (B, L, E)), float32: projected patch tokens and projected report token states; a
    `method` of the model."""
    patches = model.encoder(images, train=train)
    patches = patches[:, 1:] if model.encoder.cls_token else patches
    words = model.local_text_proj(model.local_text_norm(tokens.astype(jnp.float32)))
    return model.local_image_proj(patches).astype(jnp.float32), words.astype(jnp.float32)


def word_attention(words: jax.Array, regions: jax.Array, word_temp: float) -> jax.Array:
    """Each word's attention over each image's regions: words (L, E), regions (B, N, E) -> (B, L, N)."""
    cosine = jnp.einsum("le,bne->bln", l2_normalise(words), l2_normalise(regions))
    return jax.nn.softmax(word_temp * cosine, axis=-1)


def report_scores(
    words: jax.Array, mask: jax.Array, regions: jax.Array, word_temp: float, aggregate_temp: float
) -> jax.Array:
    """One report against every image: words (L, E) with `mask` (L,) real, regions (B, N, E) -> (B,) similarity:
    log(sum over real words of exp(aggregate_temp * cos(word, its attended context))) / aggregate_temp."""
    attended = jnp.einsum("bln,bne->ble", word_attention(words, regions, word_temp), regions)
    cosine = jnp.sum(l2_normalise(words)[None] * l2_normalise(attended), axis=-1)  # (B, L)
    scores = jnp.where(mask[None], aggregate_temp * cosine, -jnp.inf)
    return jax.nn.logsumexp(scores, axis=-1) / aggregate_temp


def similarities(
    words: jax.Array, mask: jax.Array, regions: jax.Array, word_temp: float, aggregate_temp: float
) -> jax.Array:
    """(reports, images) similarity of every report in the batch with every image, one report at a time (the
    (images, words, regions) attention of one report is the largest tensor held)."""
    return jax.lax.map(lambda wm: report_scores(wm[0], wm[1], regions, word_temp, aggregate_temp), (words, mask))


def make(model: nn.Module, config: ml_collections.ConfigDict) -> LossFn:
    a = config.local_alignment

    def objective(params: Any, batch: dict, rng: jax.Array, context: dict) -> tuple[jax.Array, dict]:
        del context
        regions, words = model.apply(
            {"params": params}, batch["image"], batch["report_tokens"], rngs={"dropout": rng}, method=embed
        )
        sims = similarities(words, batch["report_token_mask"], regions, a.word_temp, a.aggregate_temp)
        loss = symmetric_cross_entropy(a.logit_scale * sims)
        accuracy = jnp.mean(jnp.argmax(sims, axis=1) == jnp.arange(sims.shape[0]))  # report -> its own image
        return loss, {"loss": loss, "report_to_image_accuracy": accuracy}

    return objective


def pictures(painter: Any, params: Any, shown: Any) -> dict[str, np.ndarray]:
    """Word -> region attention for the first shown images whose report has stored tokens: each report's most
    attentive words (highest aggregated score), each with its attention map over its own image."""
    config, a = painter.config, painter.config.local_alignment
    table, store = _stored(config.data.embeddings_dir, config.contrastive.target, a.max_tokens)
    rows = targets.join(shown.study_ids, table, True, "shown images")
    chosen = [i for i in range(len(rows)) if rows[i] >= 0][:3]
    if not chosen:
        return {}
    examples = [store.example(int(rows[i])) for i in chosen]
    tokens = np.stack([e["report_tokens"] for e in examples])
    run = painter.jitted(
        "local_alignment.embed",
        lambda p, x, t: painter.model.apply({"params": p}, x, t, train=False, method=embed),
    )
    regions, words = (np.asarray(v) for v in run(params, jnp.asarray(shown.images[chosen]), jnp.asarray(tokens)))
    grid = shown.images.shape[1] // variant(config.model.variant)["patch_size"]
    rows_out = []
    for k, i in enumerate(chosen):
        mask = examples[k]["report_token_mask"]
        attention = np.asarray(word_attention(words[k], regions[k][None], a.word_temp))[0]  # (L, N)
        attended = attention @ regions[k]
        unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
        score = np.where(mask, np.sum(unit(words[k]) * unit(attended), axis=-1), -np.inf)
        said = store.words(int(rows[i]))
        panels = [figures.rgb(shown.pixels[i])]
        for t in np.argsort(-score)[:4]:
            if np.isfinite(score[t]):
                panels.append(
                    {
                        "image": figures.overlay(shown.pixels[i], attention[t].reshape(grid, grid)),
                        "title": f"{said[t].strip() or repr(said[t])} ({score[t]:.2f})",
                    }
                )
        rows_out.append(panels + [figures.text_panel([])] * (5 - len(panels)))
    return {
        "local_alignment": figures.grid_figure(
            rows_out,
            ["image", "word 1", "word 2", "word 3", "word 4"],
            "local alignment: each report's best-aligned words and where on its image they attend "
            "(cosine with the attended context)",
        )
    }


@functools.cache
def _stored(embeddings_dir: str, pooling: str, length: int) -> tuple[targets.TargetTable, report_tokens.ReportTokens]:
    """The run's target table and token reader, read once per process (pictures are drawn several times a run)."""
    table = targets.load_targets(embeddings_dir, pooling)
    return table, report_tokens.ReportTokens(table, length, ["local_alignment"], embeddings_dir)


def check(config: ml_collections.ConfigDict) -> None:
    if config.data.get("max_views", 1) > 1:
        raise ValueError("local_alignment aligns one image's regions with its report: set data.max_views=1")


# Its config keys (docs/config.md): key -> (default, check, description); GLoRIA's temperatures
CONFIG_ROWS: schema.Table = {
    "local_alignment.max_tokens": (
        128,
        schema.POSITIVE,
        "Local alignment: report tokens read per study (the first ones; longer reports are cut).",
    ),
    "local_alignment.embed_dim": (256, schema.POSITIVE, "Local alignment: width regions and words are compared at."),
    "local_alignment.word_temp": (4.0, schema.POSITIVE, "Local alignment: sharpness of a word's attention."),
    "local_alignment.aggregate_temp": (
        5.0,
        schema.POSITIVE,
        "Local alignment: sharpness of the log-sum-exp over a report's words.",
    ),
    "local_alignment.logit_scale": (10.0, schema.POSITIVE, "Local alignment: report-image similarity x this = logits."),
}


SPEC = Spec(
    name="local_alignment",
    make_loss=make,
    needs_targets=True,
    heads=heads,
    init=lambda model, images, targets: embed(
        model, images, jnp.zeros((images.shape[0], 1, targets.shape[-1]), jnp.float32), train=False
    ),
    check=check,
    pictures=pictures,
    config_rows=CONFIG_ROWS,
    report_tokens=lambda config: config.local_alignment.max_tokens,
)
