"""Heads for dense downstream tasks on an encoder's patch-token grid (B, h, w, D): SETR's progressive
upsampling for masks and a CenterNet head for boxes. Both start with one of two decoders (`DECODERS`) that turn
the stride-patch grid into a map at a quarter of the patch: SETR's upsampling stages, or ViTDet's simple feature
pyramid fused at its finest level."""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def upsampling_stages(x: jax.Array, widths: Sequence[int], train: bool, first: int = 0) -> jax.Array:
    """Per width: conv3x3 + BatchNorm + ReLU + 2x bilinear upsampling (SETR-PUP's stage); call it from a
    compact method (the layers become the caller's `conv_i` / `norm_i`, i counted from `first`)."""
    for i, width in enumerate(widths, start=first):
        x = nn.Conv(width, (3, 3), padding="SAME", use_bias=False, name=f"conv_{i}")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"norm_{i}")(x))
        b, h, w, c = x.shape
        x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "bilinear")
    return x


DECODERS = ("upsampling", "pyramid")


def _doublings(factor: int) -> int:
    stages = int(round(math.log2(factor)))
    if factor < 1 or 2**stages != factor:
        raise ValueError(f"the decoder doubles the token grid: patch size {factor} is not a power of 2")
    return stages


def upsample_2x(x: jax.Array, width: int, name: str) -> jax.Array:
    """A 2x2 stride-2 transposed convolution (ViTDet's upsampling step) as what it is, a linear map of each cell
    to its 2x2 block: a Dense layer and a depth-to-space reshape, several times faster than XLA's transposed
    convolution on a CPU, with the same initial distribution (fan-in over the 2x2 kernel's cells)."""
    y = nn.Dense(
        4 * width, kernel_init=nn.initializers.variance_scaling(0.25, "fan_in", "truncated_normal"), name=name
    )(x)
    b, h, w, _ = y.shape
    return y.reshape(b, h, w, 2, 2, width).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, width)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al., 2022) on the last token grid (stride p): levels at strides p/4
    (two 2x transposed convs), p/2 (one), p and 2p (2x2 max pooling), each projected to `width` by a 1x1 and a
    3x3 conv with LayerNorm; then fused at the finest level as Panoptic FPN's semantic branch does (per level
    conv3x3 + BatchNorm + ReLU, bilinear resize, sum). Returns the fused map (B, 4h, 4w, width)."""

    width: int = 256

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        x = tokens.astype(jnp.float32)
        dim = x.shape[-1]
        up = lambda y, c, name: upsample_2x(y, c, name)
        levels = [
            up(nn.gelu(nn.LayerNorm(name="up4_norm")(up(x, max(dim // 2, 1), "up4_0"))), max(dim // 4, 1), "up4_1"),
            up(x, max(dim // 2, 1), "up2"),
            x,
            nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME"),
        ]
        b, h, w, _ = levels[0].shape
        fused = 0.0
        for i, level in enumerate(levels):
            level = nn.LayerNorm(name=f"lateral_norm_{i}")(
                nn.Conv(self.width, (1, 1), use_bias=False, name=f"lateral_{i}")(level)
            )
            level = nn.LayerNorm(name=f"output_norm_{i}")(
                nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False, name=f"output_{i}")(level)
            )
            level = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False, name=f"fuse_{i}")(level)
            level = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"fuse_norm_{i}")(level))
            fused = fused + jax.image.resize(level, (b, h, w, self.width), "bilinear")
        return fused


def quarter_patch_map(
    tokens: jax.Array, decoder: str, patch_size: int, widths: Sequence[int], train: bool
) -> tuple[jax.Array, list[int]]:
    """(the decoder's map at stride patch / 4 (at least 1), the widths left for later stages); call it from a
    compact method. 'upsampling': a linear map and up to two SETR stages (one width each); 'pyramid': the simple
    feature pyramid at widths[0]."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    stages = min(2, _doublings(patch_size))
    if decoder == "pyramid":
        if stages < 2:
            raise ValueError(f"the simple feature pyramid upsamples 4x: patch size {patch_size} is below 4")
        return SimpleFeaturePyramid(width=widths[0], name="pyramid")(tokens, train), list(widths[1:])
    widths = [widths[min(i, len(widths) - 1)] for i in range(max(stages, len(widths)))]
    x = nn.Dense(widths[0], name="linear")(tokens.astype(jnp.float32))
    return upsampling_stages(x, widths[:stages], train), widths[stages:]


class ProgressiveUpsampling(nn.Module):
    """SETR's progressive-upsampling decoder (as in MGCA's ViT segmentation): a linear map, then log2(patch)
    upsampling stages (widths from `channels`, the last repeated if the patch needs more), then a 1x1 conv to
    `classes` logits at the input resolution (B, h * patch, w * patch, classes). With decoder='pyramid' the
    first two stages are the simple feature pyramid (at the first width), the rest as before."""

    patch_size: int = 16
    channels: Sequence[int] = (512, 256, 128, 64)
    classes: int = 1
    decoder: str = "upsampling"

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        stages = _doublings(self.patch_size)
        widths = [self.channels[min(i, len(self.channels) - 1)] for i in range(stages)]
        x, left = quarter_patch_map(tokens, self.decoder, self.patch_size, widths, train)
        done = min(2, stages)
        x = upsampling_stages(x, left[: stages - done], train, first=done)
        return nn.Conv(self.classes, (1, 1), name="classifier")(x)


class PlaneUpsampling(nn.Module):
    """Masks of volumes from a ViT3D's token grid (B, depth / t, h, w, D): each plane of tokens (a tubelet of t
    slices) through one ProgressiveUpsampling whose t output channels are its t slices' logits; returns
    (B, depth, h * patch, w * patch, 1). The planes share the head; the encoder already mixed them."""

    depth: int = 16
    patch_size: int = 16
    channels: Sequence[int] = (512, 256, 128, 64)
    decoder: str = "upsampling"

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        b, planes = tokens.shape[:2]
        if self.depth % planes:
            raise ValueError(f"{planes} token planes do not divide a volume of {self.depth} slices")
        t = self.depth // planes
        x = ProgressiveUpsampling(
            patch_size=self.patch_size, channels=self.channels, classes=t, decoder=self.decoder, name="planes"
        )(tokens.reshape(b * planes, *tokens.shape[2:]), train)
        h, w = x.shape[1:3]
        return x.reshape(b, planes, h, w, t).transpose(0, 1, 4, 2, 3).reshape(b, self.depth, h, w, 1)


class CenterNet(nn.Module):
    """CenterNet (Zhou et al., 2019) on the decoder's map at stride patch / 4 (at least 1): per class a centre
    heatmap (logits), and per cell the box size and the centre's sub-cell offset, both in cells.
    Returns (heatmap logits (B, H, W, classes), size (B, H, W, 2), offset (B, H, W, 2))."""

    patch_size: int = 16
    classes: int = 1
    channels: Sequence[int] = (256, 128)
    head_width: int = 64
    decoder: str = "upsampling"

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        x, _ = quarter_patch_map(tokens, self.decoder, self.patch_size, self.channels, train)

        def branch(out: int, name: str, bias: float = 0.0) -> jax.Array:
            y = nn.relu(nn.Conv(self.head_width, (3, 3), padding="SAME", name=f"{name}_conv")(x))
            return nn.Conv(out, (1, 1), name=name, bias_init=nn.initializers.constant(bias))(y)

        # the heatmap starts at p = 0.1 everywhere (CenterNet's prior), so the focal loss starts calm
        return branch(self.classes, "heatmap", -math.log(9.0)), branch(2, "size"), branch(2, "offset")

    def stride(self) -> int:
        return self.patch_size // 2 ** min(2, _doublings(self.patch_size))
