"""Windowed ViTDet-style encoder: window attention without shifting plus periodic global blocks.

Tokens are split into non-overlapping windows of `window_size` x `window_size` patches; grids that
do not divide evenly are padded and the padding is masked out of every window's attention, so a
window's output is exactly global attention restricted to its own tokens. Blocks listed in
`global_blocks` attend globally. The stack is `transformer.Encoder`'s (loop or scan, remat, drop path).
Masked image modelling cannot drop tokens from windows, so
`SimMIM` replaces masked patches by a learned token and reconstructs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvlp_jax.models.transformer import (  # noqa: F401 - window_partition, window_unpartition: part of this API
    Backbone,
    constrain,
    encoder_of,
    logical,
    window_partition,
    window_unpartition,
)
from mvlp_jax.models.vit import (
    PatchEmbed,
    flatten_study,
    patchify,
    random_masking,
    reconstruction_loss,
    study_token_mask,
    view_embedding,
)


def default_global_blocks(depth: int, every: int = 3) -> tuple[int, ...]:
    """Every `every`-th block is global: (2, 5, 8, 11) for depth 12."""
    return tuple(range(every - 1, depth, every))


class ViTDet(Backbone):
    """Windowed ViT backbone (no CLS token): (B,H,W,C) -> (B, N, width); `token_mask` (B,N) for SimMIM.

    A study (B, V, H, W, C) is one sequence (B, V*N, width), as vit.ViT reads it (position and view-type
    embeddings per view, padded views masked): windowed blocks attend within each view's windows, global blocks
    across all the study's views."""

    window_size: int = 14
    global_blocks: Sequence[int] | None = None  # default: every 3rd block
    view_types: int = 0  # > 0: a learned embedding per view type (multi-view studies)
    cls_token = False  # read by heads and objectives

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        *,
        token_mask: jax.Array | None = None,
        train: bool = False,
        view_type: jax.Array | None = None,
        view_mask: jax.Array | None = None,
    ) -> jax.Array:
        flat, b, views = flatten_study(images, token_mask, "token_mask")
        x, pos, _, grid = PatchEmbed(
            width=self.width,
            patch_size=self.patch_size,
            posemb="sincos2d",
            cls_token=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="embedding",
        )(flat)
        if token_mask is not None:
            mask_token = self.param(
                "mask_token",
                logical(nn.initializers.normal(0.02), None, None, "embed"),
                (1, 1, self.width),
                self.param_dtype,
            )
            x = jnp.where(token_mask[..., None].astype(bool), mask_token.astype(x.dtype), x)
        x = x + pos
        if self.view_types:
            x = x + view_embedding(self, b * views, view_type)
        x = x.reshape(b, -1, self.width)
        mask = None if view_mask is None else study_token_mask(view_mask, x.shape[1], False)[:, None, None]
        x = nn.Dropout(self.dropout)(constrain(x, "batch", "length", "embed"), deterministic=not train)
        global_blocks = default_global_blocks(self.depth) if self.global_blocks is None else tuple(self.global_blocks)
        return encoder_of(self, window_size=self.window_size, global_blocks=global_blocks)(
            x, train, grid, mask=mask, views=views
        )


class SimMIM(nn.Module):
    """Masked image modelling on a windowed encoder: masked patches become a learned token."""

    encoder: ViTDet
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        *,
        noise: jax.Array | None = None,
        train: bool = False,
        present: jax.Array | None = None,
    ) -> dict[str, Any]:
        """images (B,H,W,C) -> dict(loss, pred, mask, latent, grid); `present` (B,) leaves the images where it is
        False (a study's padded views) out of the loss."""
        p = self.encoder.patch_size
        b, h, w, c = images.shape
        n = (h // p) * (w // p)
        if noise is None:
            noise = jax.random.uniform(self.make_rng("masking"), (b, n))
        _, mask, _ = random_masking(noise, self.mask_ratio)
        latent = self.encoder(images, token_mask=mask, train=train)
        pred = nn.Dense(
            p * p * c,
            dtype=self.encoder.dtype,
            param_dtype=self.encoder.param_dtype,
            name="pred",
            kernel_init=logical(nn.initializers.xavier_uniform(), "embed", None),
            bias_init=logical(nn.initializers.zeros, None),
        )(latent)
        scored = mask if present is None else mask * present[:, None].astype(mask.dtype)
        loss = reconstruction_loss(pred, patchify(images, p), scored, self.norm_pix_loss)
        return dict(loss=loss, pred=pred, mask=mask, latent=latent, grid=(h // p, w // p))
