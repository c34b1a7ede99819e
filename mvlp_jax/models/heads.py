"""Heads on encoder tokens: pooling (MAP, mean, CLS), projections, the DINO head, the box head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mvlp_jax.models.norm import l2_normalise
from mvlp_jax.models.transformer import Attention, Dtype, MlpBlock, layer_norm, logical

POOLINGS = ("map", "mean", "cls")


class MAPHead(nn.Module):
    """Multi-head attention pooling with a learned probe (big_vision's MAP): (B, L, D) -> (B, D)."""

    num_heads: int
    mlp_dim: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    sow_attention: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """`mask` (B, L): the tokens to pool (a study's padded views are False)."""
        b, _, d = tokens.shape
        probe = self.param(
            "probe", logical(nn.initializers.xavier_uniform(), None, None, "embed"), (1, 1, d), self.param_dtype
        )
        x = Attention(
            num_heads=self.num_heads,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            sow_weights=self.sow_attention,
            attention=self.attention,
            name="attention",
        )(
            jnp.broadcast_to(probe.astype(tokens.dtype), (b, 1, d)),
            tokens,
            mask=None if mask is None else mask[:, None, None, :],
        )
        y = layer_norm("norm", 1e-6, self.dtype, self.param_dtype)(x)
        x = x + MlpBlock(mlp_dim=self.mlp_dim or 4 * d, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(y)
        return x[:, 0]


class Pool(nn.Module):
    """Pools encoder tokens by `kind`; `has_cls` says whether tokens[:, 0] is a CLS token."""

    kind: str = "map"
    has_cls: bool = True
    num_heads: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    sow_attention: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """`mask` (B, L) over `tokens` (CLS included): the tokens present (a study's padded views are not)."""
        if self.kind not in POOLINGS:
            raise ValueError(f"pooling {self.kind!r}; choose one of {POOLINGS}")
        if self.kind == "cls":
            if not self.has_cls:
                raise ValueError("pooling 'cls' needs an encoder with a CLS token")
            return tokens[:, 0]
        patches = tokens[:, 1:] if self.has_cls else tokens
        present = None if mask is None else (mask[:, 1:] if self.has_cls else mask)
        if self.kind == "mean":
            if present is None:
                return patches.mean(axis=1)
            weights = present[..., None].astype(patches.dtype)
            return (patches * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1)
        return MAPHead(
            num_heads=self.num_heads,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            sow_attention=self.sow_attention,
            attention=self.attention,
            name="map",
        )(patches, present)


class BatchStatNorm(nn.Module):
    """Batch normalisation with the statistics of the batch it sees (no running averages): for heads used in
    training. Under a sharded jit the batch mean is over the global batch, as the losses need.

    Evaluation of a trained head fixes the statistics instead, so an item's output does not depend on what else
    is in its batch: applied with a mutable `set_stats` collection it records the statistics of the set it sees;
    applied with that collection given, it normalises with them (mvlp_jax/evaluation/shared_space.py)."""

    use_affine: bool = True
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        recording = self.is_mutable_collection("set_stats") and not self.is_initializing()
        if self.has_variable("set_stats", "mean") and not recording:
            mean, var = self.get_variable("set_stats", "mean"), self.get_variable("set_stats", "var")
        else:
            mean = x.mean(axis=0)
            var = ((x - mean) ** 2).mean(axis=0)
            if recording:
                self.put_variable("set_stats", "mean", mean)
                self.put_variable("set_stats", "var", var)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.use_affine:
            y = y * self.param("scale", nn.initializers.ones, (x.shape[-1],)) + self.param(
                "bias", nn.initializers.zeros, (x.shape[-1],)
            )
        return y


class ProjectionHead(nn.Module):
    """Linear, or MLP (Dense -> norm -> GELU) x (depth-1) -> Dense; norm 'layer', 'batch' (batch statistics,
    see BatchStatNorm) or 'none'; `out_norm` adds a final batch norm without affine (M-FLAG's image head)."""

    out_dim: int
    kind: str = "linear"
    hidden_dim: int = 2048
    depth: int = 2
    norm: str = "layer"
    dtype: Dtype = jnp.float32
    out_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"projection kind {self.kind!r}; choose 'linear' or 'mlp'")
        if self.kind == "mlp":
            for i in range(self.depth - 1):
                x = nn.Dense(self.hidden_dim, dtype=self.dtype, name=f"hidden_{i}")(x)
                if self.norm == "layer":
                    x = nn.LayerNorm(dtype=self.dtype, name=f"norm_{i}")(x)
                elif self.norm == "batch":
                    x = BatchStatNorm(name=f"norm_{i}")(x).astype(self.dtype)
                x = nn.gelu(x)
        x = nn.Dense(self.out_dim, dtype=self.dtype, name="out")(x)
        return BatchStatNorm(use_affine=False, name="out_norm")(x) if self.out_norm else x


class DINOHead(nn.Module):
    """DINO head: MLP -> L2-normalised bottleneck -> weight-normalised linear layer (no bias)."""

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    depth: int = 3
    norm_last_layer: bool = True  # freezes the weight-norm gain at 1, as DINO recommends

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth - 1):
            x = nn.gelu(
                nn.Dense(self.hidden_dim, name=f"hidden_{i}", kernel_init=nn.initializers.truncated_normal(0.02))(x)
            )
        x = nn.Dense(self.bottleneck_dim, name="bottleneck", kernel_init=nn.initializers.truncated_normal(0.02))(x)
        x = l2_normalise(x, eps=1e-12)
        v = self.param("last_v", nn.initializers.truncated_normal(0.02), (self.bottleneck_dim, self.out_dim))
        w = v / jnp.linalg.norm(v, axis=0, keepdims=True)
        if not self.norm_last_layer:
            w = w * self.param("last_g", nn.initializers.ones, (self.out_dim,))
        return x @ w


class BoxHead(nn.Module):
    """Predicts a normalised box (cx, cy, w, h) in [0, 1] from a feature vector."""

    hidden_dim: int = 256
    depth: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth - 1):
            x = nn.relu(nn.Dense(self.hidden_dim, name=f"hidden_{i}")(x))
        return jax.nn.sigmoid(nn.Dense(4, name="out")(x))


def last_block_attention(model: nn.Module, params, images: jax.Array, **kwargs) -> jax.Array:
    """Attention weights (B, heads, L, L) of the encoder's last block, for visualisation.

    `model` must be built with sow_attention=True (ViT, ViTDet); scanned stacks return layer -1.
    """
    _, state = model.apply({"params": params}, images, mutable=["intermediates"], **kwargs)
    leaves = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.get("intermediates", {}))
        if "attention_weights" in jax.tree_util.keystr(path)
    ]
    if not leaves:
        raise ValueError("no attention weights were sown: build the model with sow_attention=True")
    last = leaves[-1]
    last = last[0] if isinstance(last, tuple) else last
    return last[-1] if last.ndim == 5 else last
