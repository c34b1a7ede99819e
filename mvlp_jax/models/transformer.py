"""Transformer building blocks shared by ViT, MAE's decoder, ViTDet and the pooling heads.

Parameters and activations carry logical axis names ('embed', 'mlp', 'heads', 'kv', 'batch',
'length', 'layers'), so `mvlp_jax.sharding` maps them onto a mesh by rules instead of per-model code.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mvlp_jax.kernels.cpu_blas import batched_matmul, mkl_attention, use_blas
from mvlp_jax.kernels.gemm_choice import use_mkl_gemm
from mvlp_jax.models.matmul import dense_dot_general, matmul
from mvlp_jax.models.norm import LayerNorm

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
    """Activation sharding by logical names (mvlp_jax.sharding.RULES; identity without a mesh)."""
    from mvlp_jax import sharding  # the one place that knows meshes
    return sharding.constrain(x, names)


def sincos_2d(height: int, width: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embeddings, (height*width, dim), rows outer.

    Log-spaced frequencies; layout [sin_w | cos_w | sin_h | cos_h], the layout of the original MAE
    code and so of every public MAE checkpoint (transformers rotates its table to it).
    Computed for any grid, so a model trained at one size runs at another without interpolation.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    omega = 1.0 / temperature ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    grid_h, grid_w = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64),
                                 indexing="ij")
    emb_h = np.outer(grid_h.ravel(), omega)
    emb_w = np.outer(grid_w.ravel(), omega)
    return np.concatenate([np.sin(emb_w), np.cos(emb_w), np.sin(emb_h), np.cos(emb_h)], axis=1).astype(np.float32)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)): PyTorch's formula, and so that of public ViT/MAE
    checkpoints. jax.nn.gelu(approximate=False) writes it with erfc, which XLA:CPU evaluates at about twice
    the cost (MAE decoder MLP, forward + backward: 49 vs 23 ms over the two matmuls alone)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(D)) over keys, in float32; q (B,H,Q,D), k (B,H,K,D), mask broadcastable to
    (B,H,Q,K) (True = attend)."""
    logits = batched_matmul(q * (1.0 / math.sqrt(q.shape[-1])), k, transpose_b=True).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


@jax.custom_vjp
def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    return _attend_fwd(q, k, v, mask)[0]


def _attend_fwd(q, k, v, mask):
    weights = attention_weights(q, k, mask)
    out = batched_matmul(weights.astype(v.dtype), v)
    return out, (q, k, v, weights, out)


def _attend_bwd(residuals, d_out):
    """Softmax's backward with rowsum(dP * P) taken as rowsum(dO * O) (equal, as O = P V; FlashAttention's
    identity): one pass over (B,H,Q,D) instead of two over the (B,H,Q,K) tensors that set the cost on CPU
    (MAE B/16's decoder: 40 MB each, per layer). The 1/sqrt(D) scale goes onto d_q and d_k: on the
    (B,H,Q,K) product XLA:CPU materialised it as a 40 MB broadcast that every decoder layer re-read."""
    q, k, v, weights, out = residuals
    scale = 1.0 / math.sqrt(q.shape[-1])
    d_weights = batched_matmul(d_out, v, transpose_b=True).astype(jnp.float32)
    row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_scores = (weights * (d_weights - row_dot)).astype(q.dtype)  # w.r.t. q k^T, before the scale
    d_q = (batched_matmul(d_scores, k) * scale).astype(q.dtype)
    d_k = (batched_matmul(d_scores, q, transpose_a=True) * scale).astype(k.dtype)
    d_v = batched_matmul(weights.astype(d_out.dtype), d_out, transpose_a=True).astype(v.dtype)
    return d_q, d_k, d_v, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v with the memory-lean backward above; shapes as in `attention_weights`.

    Heads-major layout: each dot is a plain batched matmul over (B, H). With (B, L, H, D) inputs XLA's CPU
    backend picked transposed layouts: MAE's decoder attention (B/16) ran its forward 2.4x slower.
    """
    return _attend(q, k, v, mask)


class HeadsProjection(nn.Module):
    """x (B, L, width) -> (B, heads, L, head_dim), or (B, L, heads, head_dim) when not `heads_major`;
    kernel (width, heads, head_dim) as nn.DenseGeneral's."""
    num_heads: int
    head_dim: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    heads_major: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", logical(flat_init(nn.initializers.xavier_uniform(), 1), "embed", "heads", "kv"),
                            (x.shape[-1], self.num_heads, self.head_dim), self.param_dtype)
        bias = (self.param("bias", logical(nn.initializers.zeros, "heads", "kv"), (self.num_heads, self.head_dim),
                           self.param_dtype) if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if use_mkl_gemm(x, kernel):  # one (B*L, width) x (width, heads*head_dim) GEMM in MKL
            y = matmul(x, kernel.reshape(kernel.shape[0], -1)).reshape(x.shape[:2] + kernel.shape[1:])
            y = y.transpose(0, 2, 1, 3) if self.heads_major else y
        else:
            y = jnp.einsum("bld,dhk->bhlk" if self.heads_major else "bld,dhk->blhk", x, kernel)
        if bias is None:
            return y
        return y + (bias[:, None, :] if self.heads_major else bias)


class HeadsMerge(nn.Module):
    """(B, heads, L, head_dim), or (B, L, heads, head_dim) when not `heads_major`, -> (B, L, width); kernel
    (heads, head_dim, width) as nn.DenseGeneral's."""
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    heads_major: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        heads, head_dim = (x.shape[1], x.shape[3]) if self.heads_major else x.shape[2:]
        kernel = self.param("kernel", logical(flat_init(nn.initializers.xavier_uniform(), 2), "heads", "kv", "embed"),
                            (heads, head_dim, self.width), self.param_dtype)
        bias = self.param("bias", logical(nn.initializers.zeros, "embed"), (self.width,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if use_mkl_gemm(x, kernel):
            x = x.transpose(0, 2, 1, 3) if self.heads_major else x
            return matmul(x.reshape(x.shape[:2] + (heads * head_dim,)), kernel.reshape(heads * head_dim, -1)) + bias
        return jnp.einsum("bhlk,hkd->bld" if self.heads_major else "blhk,hkd->bld", x, kernel) + bias


class Attention(nn.Module):
    """Multi-head attention (self, or cross with `inputs_kv`); sows its weights when asked.

    Unmasked float32 attention on a single-device CPU runs in MKL (`mkl_attention`) on length-major
    (B, L, heads, head_dim) tensors, the projections' own layout; everything else heads-major in XLA.
    """
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    qkv_bias: bool = True
    sow_weights: bool = False

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        width = inputs_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        fused = mask is None and use_blas(self.dtype)  # the projections compute in self.dtype
        names = ("batch", "length", "heads", "kv") if fused else ("batch", "heads", "length", "kv")

        def project(name: str, x: jax.Array) -> jax.Array:
            y = HeadsProjection(self.num_heads, width // self.num_heads, self.qkv_bias, self.dtype,
                                self.param_dtype, heads_major=not fused, name=name)(x)
            return constrain(y, *names)

        q, k, v = project("query", inputs_q), project("key", inputs_kv), project("value", inputs_kv)
        out = mkl_attention(q, k, v) if fused else dot_product_attention(q, k, v, mask)
        if self.sow_weights:
            heads_major = (lambda x: x.transpose(0, 2, 1, 3)) if fused else (lambda x: x)
            self.sow("intermediates", "attention_weights", attention_weights(heads_major(q), heads_major(k), mask))
        return HeadsMerge(width, self.dtype, self.param_dtype, heads_major=not fused, name="out")(out)


class MlpBlock(nn.Module):
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width = x.shape[-1]
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1",
                     dot_general=dense_dot_general,
                     kernel_init=logical(nn.initializers.xavier_uniform(), "embed", "mlp"),
                     bias_init=logical(nn.initializers.normal(1e-6), "mlp"))(x)
        h = gelu(constrain(h, "batch", "length", "mlp"))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        return nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2",
                        dot_general=dense_dot_general,
                        kernel_init=logical(nn.initializers.xavier_uniform(), "mlp", "embed"),
                        bias_init=logical(nn.initializers.normal(1e-6), "embed"))(h)


def layer_norm(name: str, eps: float, dtype: Dtype, param_dtype: Dtype) -> LayerNorm:
    return LayerNorm(eps, dtype, param_dtype, name=name)


class Block(nn.Module):
    """Pre-LayerNorm transformer block with dropout and stochastic depth (per-sample drop path).

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

    def _drop_path(self, y: jax.Array, rate: jax.Array) -> jax.Array:
        if not (self.train and self.use_drop_path):
            return y
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, (y.shape[0],) + (1,) * (y.ndim - 1))
        return jnp.where(keep, y / (1.0 - rate), 0.0).astype(y.dtype)

    @nn.compact
    def __call__(self, x: jax.Array, drop_rate: jax.Array | float = 0.0,
                 mask: jax.Array | None = None) -> tuple[jax.Array, None]:
        x = constrain(x, "batch", "length", "embed")
        norm = lambda name: layer_norm(name, self.layer_norm_eps, self.dtype, self.param_dtype)
        y = Attention(self.num_heads, self.dtype, self.param_dtype, sow_weights=self.sow_attention,
                      name="attention")(norm("norm1")(x), mask=mask)
        y = nn.Dropout(self.dropout)(y, deterministic=not self.train)
        x = x + self._drop_path(y, drop_rate)
        y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.param_dtype, name="mlp")(norm("norm2")(x), self.train)
        y = nn.Dropout(self.dropout)(y, deterministic=not self.train)
        x = x + self._drop_path(y, drop_rate)
        return constrain(x, "batch", "length", "embed"), None


class Encoder(nn.Module):
    """`depth` blocks (looped or scanned, optionally rematerialised) then a final LayerNorm."""
    depth: int
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    drop_path: float = 0.0
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat_policy: str = "none"
    sow_attention: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}")
        block_cls = Block
        if self.remat_policy != "none":
            block_cls = nn.remat(Block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan)
        kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                      use_drop_path=self.drop_path > 0, layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
                      param_dtype=self.param_dtype, train=train, sow_attention=self.sow_attention)
        rates = jnp.linspace(0.0, self.drop_path, self.depth)  # stochastic depth grows with depth
        if self.scan:
            stack = nn.scan(block_cls, variable_axes={"params": 0, "intermediates": 0},
                            split_rngs={"params": True, "dropout": True}, in_axes=0, length=self.depth,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(**kwargs, name="blocks")(x, rates)
        else:
            for i in range(self.depth):
                x, _ = block_cls(**kwargs, name=f"block_{i:02d}")(x, rates[i])
        return layer_norm("norm", self.layer_norm_eps, self.dtype, self.param_dtype)(x)


def count_params(params) -> int:
    return int(sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(nn.unbox(params))))
