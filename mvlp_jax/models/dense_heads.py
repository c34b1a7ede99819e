"""Heads for dense downstream tasks on a frozen encoder's patch-token grid (B, h, w, D): SETR's progressive
upsampling for masks, and a CenterNet head on a 4x upsampled map for boxes."""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def upsampling_stages(x: jax.Array, widths: Sequence[int], train: bool) -> jax.Array:
    """Per width: conv3x3 + BatchNorm + ReLU + 2x bilinear upsampling (SETR-PUP's stage); call it from a
    compact method (the layers become the caller's `conv_i` / `norm_i`)."""
    for i, width in enumerate(widths):
        x = nn.Conv(width, (3, 3), padding="SAME", use_bias=False, name=f"conv_{i}")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"norm_{i}")(x))
        b, h, w, c = x.shape
        x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "bilinear")
    return x


def _doublings(factor: int) -> int:
    stages = int(round(math.log2(factor)))
    if factor < 1 or 2 ** stages != factor:
        raise ValueError(f"the decoder doubles the token grid: patch size {factor} is not a power of 2")
    return stages


class ProgressiveUpsampling(nn.Module):
    """SETR's progressive-upsampling decoder (as in MGCA's ViT segmentation): a linear map, then log2(patch)
    upsampling stages (widths from `channels`, the last repeated if the patch needs more), then a 1x1 conv to
    `classes` logits at the input resolution (B, h * patch, w * patch, classes)."""
    patch_size: int = 16
    channels: Sequence[int] = (512, 256, 128, 64)
    classes: int = 1

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        stages = _doublings(self.patch_size)
        widths = [self.channels[min(i, len(self.channels) - 1)] for i in range(stages)]
        x = nn.Dense(widths[0], name="linear")(tokens.astype(jnp.float32))
        return nn.Conv(self.classes, (1, 1), name="classifier")(upsampling_stages(x, widths, train))


class CenterNet(nn.Module):
    """CenterNet (Zhou et al., 2019) on the token grid upsampled 4x (stride patch / 4, at least 1): per class a
    centre heatmap (logits), and per cell the box size and the centre's sub-cell offset, both in cells.
    Returns (heatmap logits (B, H, W, classes), size (B, H, W, 2), offset (B, H, W, 2))."""
    patch_size: int = 16
    classes: int = 1
    channels: Sequence[int] = (256, 128)
    head_width: int = 64

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        stages = min(2, _doublings(self.patch_size))
        widths = [self.channels[min(i, len(self.channels) - 1)] for i in range(stages)]
        x = nn.Dense(widths[0], name="linear")(tokens.astype(jnp.float32))
        x = upsampling_stages(x, widths, train)

        def branch(out: int, name: str, bias: float = 0.0) -> jax.Array:
            y = nn.relu(nn.Conv(self.head_width, (3, 3), padding="SAME", name=f"{name}_conv")(x))
            return nn.Conv(out, (1, 1), name=name, bias_init=nn.initializers.constant(bias))(y)
        # the heatmap starts at p = 0.1 everywhere (CenterNet's prior), so the focal loss starts calm
        return branch(self.classes, "heatmap", -math.log(9.0)), branch(2, "size"), branch(2, "offset")

    def stride(self) -> int:
        return self.patch_size // 2 ** min(2, _doublings(self.patch_size))
