"""softmax(q k^T / sqrt(D)) v: one function, several implementations, chosen per platform.

  attention(q, k, v, mask, implementation)   q (B, Q, H, D), k and v (B, K, H, D) -> (B, Q, H, D)

Inputs are length-major, the projections' own layout and that of `jax.nn.dot_product_attention`. `mask`
broadcasts to (B, H, Q, K), True = attend; softmax is taken in float32 whatever the compute dtype.

Implementations (`IMPLEMENTATIONS`; `config.model.attention`):
- `xla`: the formula in XLA's ops, heads-major, with a memory-lean hand-written backward. Runs everywhere; keeps
  the (B, H, Q, K) float32 weights for the backward pass, so its memory grows with L^2.
- `tpu_flash`: the Pallas TPU flash-attention kernel (`jax.experimental.pallas.ops.tpu.flash_attention`):
  blockwise, O(L) memory. Lengths are padded to its 128-token blocks; a key mask (one that broadcasts over
  heads and queries: ViTDet's padded windows) becomes its segment ids.
- `cudnn`: cuDNN's fused attention through `jax.nn.dot_product_attention` (GPU; bfloat16 or float16).
- `mkl`: MKL's float32 kernel on a single CPU device (`cpu_blas.mkl_attention`), without a mask.
- `auto` (the default): `tpu_flash` on TPU, `cudnn` on GPU, `mkl` on CPU where each applies, else `xla`.

Where a kernel cannot take a call (a mask it cannot express, a dtype it does not run, queries too short to fill
a block), that call runs `xla`: the same values. A kernel named for another platform than the program's is an
error.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mvlp_jax.kernels import backend, cpu_blas

IMPLEMENTATIONS = ("auto", "xla", "tpu_flash", "cudnn", "mkl")
PLATFORM_OF = {"tpu_flash": "tpu", "cudnn": "gpu", "mkl": "cpu"}
AUTO = {"tpu": "tpu_flash", "gpu": "cudnn", "cpu": "mkl"}
FLASH_BLOCK = 128  # tokens per block of the TPU kernel (its default block sizes)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
              implementation: str = "auto") -> jax.Array:
    """softmax(q k^T / sqrt(D)) v, length-major (see the module docstring), by `implementation`."""
    chosen = choose(implementation, q, k, mask)
    if chosen == "tpu_flash":
        return _tpu_flash(q, k, v, mask)
    if chosen == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    if chosen == "mkl":
        return cpu_blas.mkl_attention(q, k, v)
    heads_major = lambda x: x.transpose(0, 2, 1, 3)
    return heads_major(_attend(heads_major(q), heads_major(k), heads_major(v), mask))


def choose(implementation: str, q: jax.Array, k: jax.Array, mask: jax.Array | None) -> str:
    """The implementation that runs this call under the current backend."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r}; choose one of {IMPLEMENTATIONS}")
    platform = backend.current().platform
    if implementation == "auto":
        implementation = AUTO.get(platform, "xla")
    elif implementation in PLATFORM_OF and platform not in (PLATFORM_OF[implementation], "any"):
        raise ValueError(f"attention={implementation!r} runs on {PLATFORM_OF[implementation]} devices; this "
                         f"program is for {platform} devices: use 'auto' or 'xla'")
    if implementation == "xla" or not _applies(implementation, q, k, mask):
        return "xla"
    return implementation


def _applies(implementation: str, q: jax.Array, k: jax.Array, mask: jax.Array | None) -> bool:
    if implementation == "tpu_flash":
        return min(q.shape[1], k.shape[1]) >= FLASH_BLOCK and (mask is None or _key_mask(mask, k) is not None)
    if implementation == "cudnn":
        return q.dtype in (jnp.bfloat16, jnp.float16)
    if implementation == "mkl":
        return mask is None and backend.current().mkl and all(x.dtype == jnp.float32 for x in (q, k))
    return False


def _key_mask(mask: jax.Array, k: jax.Array) -> jax.Array | None:
    """(B, K) when `mask` broadcasts over heads and queries (a padding mask), else None."""
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        return None
    return jnp.broadcast_to(mask[:, 0, 0, :], (k.shape[0], k.shape[1]))


def _pad_to_block(x: jax.Array, length: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def _tpu_flash(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Pallas TPU flash attention. A Mosaic kernel has no sharding rule, so on a mesh it runs per shard
    (shard_map over the batch and heads axes, as the activations are laid out); attention never mixes those."""
    from mvlp_jax import sharding

    keys = jnp.ones(k.shape[:2], bool) if mask is None else _key_mask(mask, k)
    local = functools.partial(_tpu_flash_local, masked=mask is not None)
    mesh = sharding.active_mesh()
    if mesh is None or mesh.size == 1:
        return local(q, k, v, keys)
    spec = sharding.activation_spec(q.shape, ("batch", "length", "heads", "kv"), mesh)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(spec[0], None)), out_specs=spec,
                         check_vma=False)(q, k, v, keys)


def _tpu_flash_local(q: jax.Array, k: jax.Array, v: jax.Array, keys: jax.Array, masked: bool) -> jax.Array:
    """The kernel on one shard: lengths padded to whole blocks, padding and masked keys in segment 0 and every
    query in segment 1, so no query attends them (padded queries' outputs are cut off)."""
    from jax.experimental.pallas.ops.tpu import flash_attention as flash

    (b, q_len, _, d), k_len = q.shape, k.shape[1]
    q_pad, k_pad = (-(-n // FLASH_BLOCK) * FLASH_BLOCK for n in (q_len, k_len))
    segments = None
    if masked or k_pad != k_len:
        segments = flash.SegmentIds(q=jnp.ones((b, q_pad), jnp.int32),
                                    kv=jnp.pad(keys, ((0, 0), (0, k_pad - k_len))).astype(jnp.int32))
    heads_major = lambda x, n: _pad_to_block(x, n).transpose(0, 2, 1, 3)
    out = flash.flash_attention(heads_major(q, q_pad), heads_major(k, k_pad), heads_major(v, k_pad),
                                segment_ids=segments, sm_scale=1.0 / math.sqrt(d))
    return out.transpose(0, 2, 1, 3)[:, :q_len]


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(D)) over keys, float32 (B, H, Q, K), from length-major q and k: what a model sows
    to show where it looks."""
    heads_major = lambda x: x.transpose(0, 2, 1, 3)
    return _weights(heads_major(q), heads_major(k), mask)


def _batched_matmul(a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
    """Batched matmul over leading axes: MKL's on a backend that loaded it (XLA:CPU runs these small GEMMs
    on one thread), else one XLA dot with the transposes folded in."""
    if backend.current().mkl and a.dtype == b.dtype == jnp.float32:
        return cpu_blas.blas_matmul(a, b, transpose_a, transpose_b)
    return jnp.einsum(f"...{'km' if transpose_a else 'mk'},...{'nk' if transpose_b else 'kn'}->...mn", a, b)


def _weights(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Heads-major q (B,H,Q,D), k (B,H,K,D) -> float32 softmax weights (B,H,Q,K)."""
    logits = _batched_matmul(q * (1.0 / math.sqrt(q.shape[-1])), k, transpose_b=True).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


@jax.custom_vjp
def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    return _attend_fwd(q, k, v, mask)[0]


def _attend_fwd(q, k, v, mask):
    weights = _weights(q, k, mask)
    out = _batched_matmul(weights.astype(v.dtype), v)
    return out, (q, k, v, weights, out)


def _attend_bwd(residuals, d_out):
    """Softmax's backward with rowsum(dP * P) taken as rowsum(dO * O) (equal, as O = P V; FlashAttention's
    identity): one pass over (B,H,Q,D) instead of two over the (B,H,Q,K) tensors that set the cost on CPU
    (MAE B/16's decoder: 40 MB each, per layer). The 1/sqrt(D) scale goes onto d_q and d_k: on the
    (B,H,Q,K) product XLA:CPU materialised it as a 40 MB broadcast that every decoder layer re-read."""
    q, k, v, weights, out = residuals
    scale = 1.0 / math.sqrt(q.shape[-1])
    d_weights = _batched_matmul(d_out, v, transpose_b=True).astype(jnp.float32)
    row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_scores = (weights * (d_weights - row_dot)).astype(q.dtype)  # w.r.t. q k^T, before the scale
    d_q = (_batched_matmul(d_scores, k) * scale).astype(q.dtype)
    d_k = (_batched_matmul(d_scores, q, transpose_a=True) * scale).astype(k.dtype)
    d_v = _batched_matmul(weights.astype(d_out.dtype), d_out, transpose_a=True).astype(v.dtype)
    return d_q, d_k, d_v, None


_attend.defvjp(_attend_fwd, _attend_bwd)
