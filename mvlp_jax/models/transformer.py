"""Transformer building blocks shared by ViT, MAE's decoder, ViTDet and the pooling heads.

Parameters and activations carry logical axis names ('embed', 'mlp', 'heads', 'kv', 'batch',
'length', 'layers'), so `mvlp_jax.runtime.sharding` maps them onto a mesh by rules instead of per-model code.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mvlp_jax import kernels
from mvlp_jax.models.norm import LayerNorm
from mvlp_jax.runtime import logical_axes

Dtype = Any
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def logical(init, *names: str | None):
    return nn.with_logical_partitioning(init, names)


def flat_init(init, in_dims: int):
    """`init` on the kernel seen as a (prod(shape[:in_dims]), rest) matrix, as nn.DenseGeneral draws it: fan-in
    and fan-out (and so xavier's scale) are those of the matrix, not of the multi-axis shape."""

    def draw(key, shape, dtype=jnp.float32):
        return init(key, (math.prod(shape[:in_dims]), math.prod(shape[in_dims:])), dtype).reshape(shape)

    return draw


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Activation sharding by logical names (mvlp_jax.runtime.sharding.RULES; identity without a mesh)."""
    return logical_axes.constrain(x, names)


def sincos_2d(height: int, width: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embeddings, (height*width, dim), rows outer.

    Log-spaced frequencies; layout [sin_w | cos_w | sin_h | cos_h], the layout of the original MAE
    code and so of every public MAE checkpoint (transformers rotates its table to it).
    Computed for any grid, so a model trained at one size runs at another without interpolation.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    omega = 1.0 / temperature ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    grid_h, grid_w = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    emb_h = np.outer(grid_h.ravel(), omega)
    emb_w = np.outer(grid_w.ravel(), omega)
    return np.concatenate([np.sin(emb_w), np.cos(emb_w), np.sin(emb_h), np.cos(emb_h)], axis=1).astype(np.float32)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)): PyTorch's formula, and so that of public ViT/MAE
    checkpoints. jax.nn.gelu(approximate=False) writes it with erfc, which XLA:CPU evaluates at about twice
    the cost (MAE decoder MLP, forward + backward: 49 vs 23 ms over the two matmuls alone)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


class HeadsProjection(nn.Module):
    """x (B, L, width) -> (B, L, heads, head_dim); kernel (width, heads, head_dim) as nn.DenseGeneral's."""

    num_heads: int
    head_dim: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            logical(flat_init(nn.initializers.xavier_uniform(), 1), "embed", "heads", "kv"),
            (x.shape[-1], self.num_heads, self.head_dim),
            self.param_dtype,
        )
        bias = (
            self.param(
                "bias", logical(nn.initializers.zeros, "heads", "kv"), (self.num_heads, self.head_dim), self.param_dtype
            )
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = kernels.matmul(x, kernel.reshape(kernel.shape[0], -1)).reshape(x.shape[:-1] + kernel.shape[1:])
        return y if bias is None else y + bias


class HeadsMerge(nn.Module):
    """(B, L, heads, head_dim) -> (B, L, width); kernel (heads, head_dim, width) as nn.DenseGeneral's."""

    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        heads, head_dim = x.shape[2:]
        kernel = self.param(
            "kernel",
            logical(flat_init(nn.initializers.xavier_uniform(), 2), "heads", "kv", "embed"),
            (heads, head_dim, self.width),
            self.param_dtype,
        )
        bias = self.param("bias", logical(nn.initializers.zeros, "embed"), (self.width,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        merged = x.reshape(x.shape[:2] + (heads * head_dim,))
        return kernels.matmul(merged, kernel.reshape(heads * head_dim, -1)) + bias


class Attention(nn.Module):
    """Multi-head attention (self, or cross with `inputs_kv`); sows its weights when asked. `attention` names
    the implementation (`kernels.ATTENTION_IMPLEMENTATIONS`; 'auto' takes the platform's fastest)."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    qkv_bias: bool = True
    sow_weights: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(
        self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None, mask: jax.Array | None = None
    ) -> jax.Array:
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        width = inputs_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")

        def project(name: str, x: jax.Array) -> jax.Array:
            y = HeadsProjection(
                num_heads=self.num_heads,
                head_dim=width // self.num_heads,
                use_bias=self.qkv_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )(x)
            return constrain(y, "batch", "length", "heads", "kv")

        q, k, v = project("query", inputs_q), project("key", inputs_kv), project("value", inputs_kv)
        out = kernels.attention(q, k, v, mask, self.attention)
        if self.sow_weights:
            self.sow("intermediates", "attention_weights", kernels.attention_weights(q, k, mask))
        return HeadsMerge(width=width, dtype=self.dtype, param_dtype=self.param_dtype, name="out")(out)


class MlpBlock(nn.Module):
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width = x.shape[-1]
        h = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="fc1",
            dot_general=kernels.dense_dot_general,
            kernel_init=logical(nn.initializers.xavier_uniform(), "embed", "mlp"),
            bias_init=logical(nn.initializers.normal(1e-6), "mlp"),
        )(x)
        h = gelu(constrain(h, "batch", "length", "mlp"))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        return nn.Dense(
            width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="fc2",
            dot_general=kernels.dense_dot_general,
            kernel_init=logical(nn.initializers.xavier_uniform(), "mlp", "embed"),
            bias_init=logical(nn.initializers.normal(1e-6), "embed"),
        )(h)


def layer_norm(name: str, eps: float, dtype: Dtype, param_dtype: Dtype) -> LayerNorm:
    return LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


def window_partition(x: jax.Array, grid: tuple[int, int], window: int) -> tuple[jax.Array, jax.Array]:
    """(B, gh*gw, D) -> windows (B*nW, window*window, D) and a key mask (B*nW, 1, 1, window*window): grids
    that do not divide evenly are padded, and the padding is masked out of every window's attention."""
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


class Block(nn.Module):
    """Pre-LayerNorm transformer block with dropout and stochastic depth (per-sample drop path).

    With `window_size`, attention runs within non-overlapping windows of the (gh, gw) patch `grid` (ViTDet):
    always, or, in a scanned stack, where the per-layer flag `windowed` is set (global attention elsewhere). A
    sequence of `views` grids (a study) is windowed view by view: no window spans two views.
    Returns (x, None) so the same module can be scanned over layers.
    """

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    use_drop_path: bool = False
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    train: bool = False
    sow_attention: bool = False
    attention: str = "auto"
    window_size: int = 0
    grid: tuple[int, int] = (0, 0)
    views: int = 1

    def _drop_path(self, y: jax.Array, rate: jax.Array) -> jax.Array:
        if not (self.train and self.use_drop_path):
            return y
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, (y.shape[0],) + (1,) * (y.ndim - 1))
        return jnp.where(keep, y / (1.0 - rate), 0.0).astype(y.dtype)

    def _attend(self, y: jax.Array, mask: jax.Array | None, windowed: jax.Array | None) -> jax.Array:
        attention = lambda: Attention(
            num_heads=self.num_heads,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            sow_weights=self.sow_attention,
            attention=self.attention,
            name="attention",
        )

        def within_windows(y: jax.Array) -> jax.Array:
            b, length, d = y.shape
            per_view = y.reshape(b * self.views, length // self.views, d)
            windows, window_mask = window_partition(per_view, self.grid, self.window_size)
            out = window_unpartition(
                attention()(windows, mask=window_mask), b * self.views, self.grid, self.window_size
            )
            return out.reshape(b, length, d)

        if not self.window_size:
            return attention()(y, mask=mask)
        if windowed is None:
            return within_windows(y)
        return nn.cond(
            windowed, lambda module, y: within_windows(y), lambda module, y: attention()(y, mask=mask), self, y
        )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        drop_rate: jax.Array | float = 0.0,
        mask: jax.Array | None = None,
        windowed: jax.Array | None = None,
    ) -> tuple[jax.Array, None]:
        x = constrain(x, "batch", "length", "embed")
        norm = lambda name: layer_norm(name, self.layer_norm_eps, self.dtype, self.param_dtype)
        y = self._attend(norm("norm1")(x), mask, windowed)
        y = nn.Dropout(self.dropout)(y, deterministic=not self.train)
        x = x + self._drop_path(y, drop_rate)
        y = MlpBlock(
            mlp_dim=self.mlp_dim, dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp"
        )(norm("norm2")(x), self.train)
        y = nn.Dropout(self.dropout)(y, deterministic=not self.train)
        x = x + self._drop_path(y, drop_rate)
        return constrain(x, "batch", "length", "embed"), None


class EncoderSettings(nn.Module):
    """The settings of a stack of blocks: its size and how it runs. The Encoder has them, and so does every image
    encoder (Backbone), which hands them to its Encoder (`encoder_of`)."""

    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.0
    drop_path: float = 0.0
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat_policy: str = "none"
    sow_attention: bool = False
    attention: str = "auto"  # kernels.ATTENTION_IMPLEMENTATIONS


# The names of those settings, in order
ENCODER_FIELDS = tuple(name for name in EncoderSettings.__annotations__ if name not in ("parent", "name"))


class Encoder(EncoderSettings):
    """`depth` blocks (looped or scanned, optionally rematerialised) then a final LayerNorm. With
    `window_size` (ViTDet) blocks attend within windows of the patch grid, except `global_blocks`."""

    window_size: int = 0
    global_blocks: tuple[int, ...] = ()

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool = False,
        grid: tuple[int, int] = (0, 0),
        mask: jax.Array | None = None,
        views: int = 1,
    ) -> jax.Array:
        """`mask` (B, 1, 1, L): the keys every token may attend to (a study's padded views are False); `views`:
        x holds that many grids of one study, one after the other (windows stay within each)."""
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}")
        block_cls = Block
        if self.remat_policy != "none":
            block_cls = nn.remat(Block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan)
        kwargs = dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout=self.dropout,
            use_drop_path=self.drop_path > 0,
            layer_norm_eps=self.layer_norm_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            train=train,
            sow_attention=self.sow_attention,
            attention=self.attention,
            grid=tuple(grid),
            views=views,
        )
        rates = jnp.linspace(0.0, self.drop_path, self.depth)  # stochastic depth grows with depth
        windowed = [bool(self.window_size) and i not in self.global_blocks for i in range(self.depth)]
        if self.scan:
            stack = nn.scan(
                block_cls,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, 0),
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            flags = jnp.asarray(windowed) if any(windowed) and not all(windowed) else None
            window = self.window_size if any(windowed) else 0
            x, _ = stack(**kwargs, window_size=window, name="blocks")(x, rates, mask, flags)
        else:
            for i in range(self.depth):
                window = self.window_size if windowed[i] else 0
                x, _ = block_cls(**kwargs, window_size=window, name=f"block_{i:02d}")(x, rates[i], mask)
        return layer_norm("norm", self.layer_norm_eps, self.dtype, self.param_dtype)(x)


class Backbone(EncoderSettings):
    """The settings every image encoder (vit.ViT, vitdet.ViTDet, vit3d.ViT3D) shares: its Encoder's (handed over by
    `encoder_of`), its width and its patch. Each adds its own fields."""

    width: int = 768
    patch_size: int = 16


def encoder_of(model: nn.Module, **extra) -> Encoder:
    """The Encoder (parameters under "encoder") with `model`'s settings of ENCODER_FIELDS, and `extra` (a ViTDet's
    window_size and global_blocks)."""
    return Encoder(**{field: getattr(model, field) for field in ENCODER_FIELDS}, **extra, name="encoder")


def count_params(params) -> int:
    return int(sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(nn.unbox(params))))
