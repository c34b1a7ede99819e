"""Windowed ViTDet-style encoder: window attention without shifting plus periodic global blocks.

Tokens are split into non-overlapping windows of `window_size` x `window_size` patches; grids that
do not divide evenly are padded and the padding is masked out of every window's attention, so a
window's output is exactly global attention restricted to its own tokens. Blocks listed in
`global_blocks` attend globally. Masked image modelling cannot drop tokens from windows, so
`SimMIM` replaces masked patches by a learned token and reconstructs them.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvlp_jax.models.transformer import REMAT_POLICIES, Block, Dtype, constrain, layer_norm, logical
from mvlp_jax.models.vit import PatchEmbed, patchify, random_masking, reconstruction_loss


def default_global_blocks(depth: int, every: int = 3) -> tuple[int, ...]:
    """Every `every`-th block is global: (2, 5, 8, 11) for depth 12."""
    return tuple(range(every - 1, depth, every))


def window_partition(x: jax.Array, grid: tuple[int, int], window: int) -> tuple[jax.Array, jax.Array]:
    """(B, gh*gw, D) -> windows (B*nW, window*window, D) and a key mask (B*nW, 1, 1, window*window)."""
    b, _, d = x.shape
    gh, gw = grid
    ph, pw = -gh % window, -gw % window
    x = jnp.pad(x.reshape(b, gh, gw, d), ((0, 0), (0, ph), (0, pw), (0, 0)))
    nh, nw = (gh + ph) // window, (gw + pw) // window
    x = x.reshape(b, nh, window, nw, window, d).transpose(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, window * window, d)
    valid = jnp.pad(jnp.ones((gh, gw), bool), ((0, ph), (0, pw)))
    valid = valid.reshape(nh, window, nw, window).transpose(0, 2, 1, 3).reshape(nh * nw, window * window)
    mask = jnp.tile(valid, (b, 1))[:, None, None, :]
    return x, mask


def window_unpartition(x: jax.Array, batch: int, grid: tuple[int, int], window: int) -> jax.Array:
    """Inverse of `window_partition`: (B*nW, window*window, D) -> (B, gh*gw, D)."""
    gh, gw = grid
    nh, nw = -(-gh // window), -(-gw // window)
    d = x.shape[-1]
    x = x.reshape(batch, nh, nw, window, window, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, nh * window, nw * window, d)[:, :gh, :gw].reshape(batch, gh * gw, d)


class WindowedEncoder(nn.Module):
    """Blocks with window attention except at `global_blocks`; parameter names match `Encoder`'s."""
    depth: int
    num_heads: int
    mlp_dim: int
    window_size: int
    global_blocks: Sequence[int]
    dropout: float = 0.0
    drop_path: float = 0.0
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    sow_attention: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, grid: tuple[int, int], train: bool = False) -> jax.Array:
        block_cls = Block if self.remat_policy == "none" else nn.remat(Block, policy=REMAT_POLICIES[self.remat_policy])
        rates = jnp.linspace(0.0, self.drop_path, self.depth)
        for i in range(self.depth):
            block = block_cls(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                              use_drop_path=self.drop_path > 0, layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
                              param_dtype=self.param_dtype, train=train, sow_attention=self.sow_attention,
                              attention=self.attention, name=f"block_{i:02d}")
            if i in self.global_blocks:
                x, _ = block(x, rates[i])
            else:
                windows, mask = window_partition(x, grid, self.window_size)
                windows, _ = block(windows, rates[i], mask)
                x = window_unpartition(windows, x.shape[0], grid, self.window_size)
        return layer_norm("norm", self.layer_norm_eps, self.dtype, self.param_dtype)(x)


class ViTDet(nn.Module):
    """Windowed ViT backbone (no CLS token): (B,H,W,C) -> (B, N, width); `token_mask` (B,N) for SimMIM."""
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    patch_size: int = 16
    window_size: int = 14
    global_blocks: Sequence[int] | None = None  # default: every 3rd block
    dropout: float = 0.0
    drop_path: float = 0.0
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    sow_attention: bool = False
    attention: str = "auto"  # kernels.ATTENTION_IMPLEMENTATIONS
    cls_token = False  # read by heads and objectives

    @nn.compact
    def __call__(self, images: jax.Array, *, token_mask: jax.Array | None = None, train: bool = False) -> jax.Array:
        x, pos, _, grid = PatchEmbed(self.width, self.patch_size, "sincos2d", cls_token=False, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name="embedding")(images)
        if token_mask is not None:
            mask_token = self.param("mask_token", logical(nn.initializers.normal(0.02), None, None, "embed"),
                                    (1, 1, self.width), self.param_dtype)
            x = jnp.where(token_mask[..., None].astype(bool), mask_token.astype(x.dtype), x)
        x = nn.Dropout(self.dropout)(constrain(x + pos, "batch", "length", "embed"), deterministic=not train)
        global_blocks = (default_global_blocks(self.depth) if self.global_blocks is None
                         else tuple(self.global_blocks))
        return WindowedEncoder(depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                               window_size=self.window_size, global_blocks=global_blocks, dropout=self.dropout,
                               drop_path=self.drop_path, layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
                               param_dtype=self.param_dtype, remat_policy=self.remat_policy,
                               sow_attention=self.sow_attention, attention=self.attention,
                               name="encoder")(x, grid, train)


class SimMIM(nn.Module):
    """Masked image modelling on a windowed encoder: masked patches become a learned token."""
    encoder: ViTDet
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, *, noise: jax.Array | None = None, train: bool = False) -> dict[str, Any]:
        p = self.encoder.patch_size
        b, h, w, c = images.shape
        n = (h // p) * (w // p)
        if noise is None:
            noise = jax.random.uniform(self.make_rng("masking"), (b, n))
        _, mask, _ = random_masking(noise, self.mask_ratio)
        latent = self.encoder(images, token_mask=mask, train=train)
        pred = nn.Dense(p * p * c, dtype=self.encoder.dtype, param_dtype=self.encoder.param_dtype, name="pred",
                        kernel_init=logical(nn.initializers.xavier_uniform(), "embed", None),
                        bias_init=logical(nn.initializers.zeros, None))(latent)
        loss = reconstruction_loss(pred, patchify(images, p), mask, self.norm_pix_loss)
        return dict(loss=loss, pred=pred, mask=mask, latent=latent, grid=(h // p, w // p))
