"""What an objective declares about itself, so the model, the train step, the input pipeline and the config
checks can ask instead of naming it.

An objective is one module exporting `SPEC = Spec(...)` and one line in `registry.py` (or a call to
`registry.register` from anywhere, tests included).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from mvlp_jax.data.views import ViewInputs, channels
from mvlp_jax.models.vit import variant

# (params, batch, rng, context) -> (loss, metrics); context = {"step": step, "extra": the train state's extra}
LossFn = Callable[[Any, dict, jax.Array, dict], tuple[jax.Array, dict]]


def image_shape(config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], Any]:
    """One training example's image: (S, S, C), or a volume (D, S, S, C) for the volume encoder."""
    s = config.model.image_size
    if config.model.encoder == "vit3d":
        return (config.model.volume_depth, s, s, channels(config)), np.float32
    return (s, s, channels(config)), np.float32


def study_inputs(batch: dict) -> dict[str, jax.Array]:
    """The batch's view types and padding mask when it holds studies (data.max_views > 1), else nothing."""
    return {k: batch[k] for k in ("view_type", "view_mask") if k in batch}


def check_patch_multiple(config: ml_collections.ConfigDict, key: str) -> None:
    """Raises unless the crop size at dotted `key` is a multiple of the encoder's patch size."""
    group, leaf = key.split(".")
    size, patch = config[group][leaf], variant(config.model.variant)["patch_size"]
    if size % patch:
        raise ValueError(
            f"config key {key!r} = {size} must be a multiple of the patch size {patch} "
            f"(model.variant={config.model.variant!r})"
        )


@dataclasses.dataclass(frozen=True)
class SharedSpace:
    """An objective's image-text space, as `Pretrainer.apply` methods.

    images: (model, images, train) -> per-image features, each independent of the rest of its batch.
    text: (model, stored LLM vectors) -> report embeddings.
    image_head: (model, features) -> image embeddings, or None when `images` already gives them; applied to a
      whole evaluated set at once, so heads that normalise by set statistics (BatchStatNorm) see all of it.
    """

    images: Callable[..., jax.Array]
    text: Callable[..., jax.Array]
    image_head: Callable[..., jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class Spec:
    """An objective: its loss and everything around it the rest of the stack needs to know.

    name: its key in `config.objectives`.
    make_loss: (model, config) -> LossFn.
    needs_targets: it reads the frozen LLM's report vector (`batch["target"]`); the pipeline joins them and the
      model's target-dependent heads exist only with a target width.
    uses_image: it reads the augmented training image (`batch["image"]`, built once per example for all).
    entries: config -> {batch key: (per-example shape, dtype)}: the batch entries it reads besides "image" and
      "target" (the pipeline fills them with zeros on steps where a cyclic schedule does not run it).
    views: (ViewInputs) -> {batch key: array}: how the pipeline builds those entries.
    study_views: (ViewInputs of a study's present views, frontal first; their vit.VIEW_TYPES indices) -> {batch
      key: array}: the same on studies (data.max_views > 1); an objective with `views` but without it is refused
      there.
    heads: (model, config, dtype) -> {attribute: submodule or param}: set on the Pretrainer in `setup` (the
      attribute names are parameter names in checkpoints: keep them).
    init: (bound model, images, targets) -> None: runs its heads once so `init` creates their parameters.
    init_extra / update_extra: state outside the optimizer (DINO's teacher and center): init (params, config)
      -> dict merged into the train state's `extra`; update (extra, params, metrics, step, config) ->
      (extra, metrics), after the optimizer's update.
    check: config -> None, raising ValueError for settings it cannot train with.
    shared_space: how images and stored LLM vectors map into one space compared by cosine (SharedSpace):
      what retrieval and zero-shot classification evaluate.
    pictures: (painter, params, shown images) -> {picture name: RGB uint8 array}: what it learned, drawn by
      pretrain/visualize.py (the painter holds the run's config, model, seed and `jitted`) beside the pictures
      every run gets.
    config_rows: its own config keys, {dotted key: (default, check, description)} (runtime/schema.py): part of
      every pretraining config once registered, documented in docs/config.md.
    report_tokens: config -> L: it reads the first L per-token LLM states of each report (stored with the
      precompute job's --store_tokens): the pipeline adds data/report_tokens.ENTRIES (needs_targets too).
    """

    name: str
    make_loss: Callable[[Any, ml_collections.ConfigDict], LossFn]
    needs_targets: bool = False
    uses_image: bool = True
    entries: Callable[[ml_collections.ConfigDict], dict[str, tuple[tuple[int, ...], Any]]] = lambda config: {}
    views: Callable[[ViewInputs], dict[str, np.ndarray]] | None = None
    study_views: Callable[[list[ViewInputs], np.ndarray], dict[str, np.ndarray]] | None = None
    heads: Callable[[Any, ml_collections.ConfigDict, Any], dict[str, Any]] | None = None
    init: Callable[..., None] | None = None
    init_extra: Callable[[Any, ml_collections.ConfigDict], dict] | None = None
    update_extra: Callable[..., tuple[dict, dict]] | None = None
    check: Callable[[ml_collections.ConfigDict], None] | None = None
    shared_space: SharedSpace | None = None
    pictures: Callable[[Any, Any, Any], dict[str, np.ndarray]] | None = None
    config_rows: dict[str, tuple] = dataclasses.field(default_factory=dict)
    report_tokens: Callable[[ml_collections.ConfigDict], int] | None = None
