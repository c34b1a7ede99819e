"""Heads for dense downstream tasks on a frozen (or fine-tuned) encoder's patch tokens."""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class ProgressiveUpsampling(nn.Module):
    """SETR's progressive-upsampling decoder (as in MGCA's ViT segmentation): tokens (B, h, w, D) -> a linear
    map -> per stage conv3x3 + BatchNorm + ReLU + 2x bilinear upsampling, log2(patch_size) stages (channels
    from `channels`, the last repeated if the patch needs more) -> 1x1 conv to `classes` logits at the input
    resolution (B, h * patch, w * patch, classes)."""
    patch_size: int = 16
    channels: Sequence[int] = (512, 256, 128, 64)
    classes: int = 1

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        stages = int(round(math.log2(self.patch_size)))
        if 2 ** stages != self.patch_size:
            raise ValueError(f"progressive upsampling doubles the token grid: patch size {self.patch_size} is not a "
                             f"power of 2")
        widths = [self.channels[min(i, len(self.channels) - 1)] for i in range(stages)]
        x = nn.Dense(widths[0], name="linear")(tokens.astype(jnp.float32))
        for i, width in enumerate(widths):
            x = nn.Conv(width, (3, 3), padding="SAME", use_bias=False, name=f"conv_{i}")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"norm_{i}")(x))
            b, h, w, c = x.shape
            x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "bilinear")
        return nn.Conv(self.classes, (1, 1), name="classifier")(x)
