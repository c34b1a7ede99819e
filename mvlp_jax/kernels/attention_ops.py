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
- `tpu_splash`: the Pallas TPU splash-attention kernel (`...pallas.ops.tpu.splash_attention`, MaxText's),
  the same padding and segment ids, tiles of up to 512 tokens and a full mask per head.
- `cudnn`: cuDNN's fused attention through `jax.nn.dot_product_attention` (GPU; bfloat16 or float16; heads of a
  multiple of 8 up to 128). Odd lengths (a CLS token) are padded by one token that cuDNN's sequence lengths keep
  out; a mask reaches cuDNN as an additive bias of the logits' shape (a key mask, ViTDet's padded windows, is
  broadcast over the queries).
- `mkl`: MKL's float32 kernel on a single CPU device (`cpu_blas.mkl_attention`), without a mask.
- `auto` (the default): `tpu_splash` on TPU, `cudnn` on GPU, `mkl` on CPU where each applies, else `xla`.

Where a kernel cannot take a call (a mask it cannot express, a dtype it does not run, queries too short to fill
a block), that call runs `xla`: the same values (for an accelerator's kernel, said once per kind of call in the
log). A kernel named for another platform than the program's is an error.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mvlp_jax.kernels import backend, cpu_blas
from mvlp_jax.runtime import logical_axes

IMPLEMENTATIONS = ("auto", "xla", "tpu_splash", "tpu_flash", "cudnn", "mkl")
PLATFORM_OF = {"tpu_splash": "tpu", "tpu_flash": "tpu", "cudnn": "gpu", "mkl": "cpu"}
AUTO = {"tpu": "tpu_splash", "gpu": "cudnn", "cpu": "mkl"}
FLASH_BLOCK = 128  # tokens per block of the TPU kernel (its default block sizes)
SPLASH_BLOCK = 512  # the splash tiles mvlp_jax asks for; smaller where a padded length needs it
CUDNN_MAX_HEAD_DIM = 128  # 256 from Hopper on; a traced call does not know its GPU's generation


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, implementation: str = "auto"
) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v, length-major (see the module docstring), by `implementation`."""
    chosen = choose(implementation, q, k, mask)
    if chosen == "tpu_flash":
        return _tpu_kernel(q, k, v, mask, _tpu_flash_local)
    if chosen == "tpu_splash":
        return _tpu_kernel(q, k, v, mask, _tpu_splash_local)
    if chosen == "cudnn":
        return _cudnn(q, k, v, mask)
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
        raise ValueError(
            f"attention={implementation!r} runs on {PLATFORM_OF[implementation]} devices; this "
            f"program is for {platform} devices: use 'auto' or 'xla'"
        )
    if implementation == "xla":
        return "xla"
    reason = _why_not(implementation, q, k, mask)
    if reason:
        if implementation != "mkl":  # MKL is a CPU convenience; an accelerator kernel not taken costs memory
            _say_fallback(implementation, reason)
        return "xla"
    return implementation


@functools.cache
def _say_fallback(kernel: str, reason: str) -> None:
    logging.warning(
        "attention: %s does not take calls with %s; those run XLA's formula (the same values)", kernel, reason
    )


def _why_not(implementation: str, q: jax.Array, k: jax.Array, mask: jax.Array | None) -> str:
    """Why `implementation` cannot take this call, in words ('' when it can)."""
    mask_form = "" if mask is None else f"a mask of shape {tuple(mask.shape)}"
    if implementation in ("tpu_flash", "tpu_splash"):
        if min(q.shape[1], k.shape[1]) < FLASH_BLOCK:
            return f"fewer than {FLASH_BLOCK} queries or keys"
        return mask_form if mask is not None and _key_mask(mask, k) is None else ""
    if implementation == "cudnn":  # the shapes cuDNN's fused kernel takes (jax's check_is_flash_attention)
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            return f"{q.dtype.name} inputs (cuDNN runs bfloat16 and float16: model.dtype)"
        if q.shape[-1] % 8 or q.shape[-1] > CUDNN_MAX_HEAD_DIM:
            return f"heads of {q.shape[-1]} (a multiple of 8 up to {CUDNN_MAX_HEAD_DIM})"
        return mask_form if mask is not None and (mask.ndim != 4 or mask.shape[1] not in (1, q.shape[2])) else ""
    if implementation == "mkl":
        usable = mask is None and backend.current().mkl and all(x.dtype == jnp.float32 for x in (q, k))
        return "" if usable else "a mask, another dtype than float32, or no MKL"
    return f"{implementation} (unknown)"


def _key_mask(mask: jax.Array, k: jax.Array) -> jax.Array | None:
    """(B, K) when `mask` broadcasts over heads and queries (a padding mask), else None."""
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        return None
    return jnp.broadcast_to(mask[:, 0, 0, :], (k.shape[0], k.shape[1]))


def _pad_to_block(x: jax.Array, length: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """cuDNN's fused kernel. Its training path takes even lengths only: an odd one gets one padding token, kept
    out by cuDNN's sequence lengths (or by the mask, when there is one; padded queries' outputs are cut off). A
    mask reaches cuDNN as an additive bias of the logits' shape, so a key mask is broadcast over the queries."""
    (b, q_len), k_len = q.shape[:2], k.shape[1]
    q_pad, k_pad = q_len + q_len % 2, k_len + k_len % 2
    q, k, v = _pad_to_block(q, q_pad), _pad_to_block(k, k_pad), _pad_to_block(v, k_pad)
    lengths = {}
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, mask.shape[1], q_len, k_len))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, q_pad - q_len), (0, k_pad - k_len)))
    elif (q_pad, k_pad) != (q_len, k_len):
        lengths = dict(
            query_seq_lengths=jnp.full((b,), q_len, jnp.int32), key_value_seq_lengths=jnp.full((b,), k_len, jnp.int32)
        )
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn", **lengths)
    return out[:, :q_len]


def _tpu_kernel(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, local: Callable) -> jax.Array:
    """A Pallas TPU kernel (`local(q, k, v, keys, masked)` on one shard). A Mosaic kernel has no sharding rule,
    so on a mesh it runs per shard (shard_map over the batch and heads axes, as the activations are laid out);
    attention never mixes those."""
    keys = jnp.ones(k.shape[:2], bool) if mask is None else _key_mask(mask, k)
    local = functools.partial(local, masked=mask is not None)
    mesh = logical_axes.active_mesh()
    if mesh is None or mesh.size == 1:
        return local(q, k, v, keys)
    spec = logical_axes.activation_spec(q.shape, ("batch", "length", "heads", "kv"), mesh)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(spec, spec, spec, P(spec[0], None)), out_specs=spec, check_vma=False
    )(q, k, v, keys)


def _blocked(q: jax.Array, k: jax.Array, v: jax.Array, keys: jax.Array, masked: bool, segment_ids: type):
    """Heads-major q, k, v padded to whole FLASH_BLOCKs, and the segment ids (of class `segment_ids`) that keep
    padding and masked keys out: those in segment 0, every query in segment 1 (None when nothing is kept out)."""
    (b, q_len), k_len = q.shape[:2], k.shape[1]
    q_pad, k_pad = (-(-n // FLASH_BLOCK) * FLASH_BLOCK for n in (q_len, k_len))
    segments = None
    if masked or k_pad != k_len:
        segments = segment_ids(
            q=jnp.ones((b, q_pad), jnp.int32), kv=jnp.pad(keys, ((0, 0), (0, k_pad - k_len))).astype(jnp.int32)
        )
    heads_major = lambda x, n: _pad_to_block(x, n).transpose(0, 2, 1, 3)
    return heads_major(q, q_pad), heads_major(k, k_pad), heads_major(v, k_pad), segments


def _tpu_flash_local(q: jax.Array, k: jax.Array, v: jax.Array, keys: jax.Array, masked: bool) -> jax.Array:
    """The flash kernel on one shard (padded queries' outputs are cut off)."""
    from jax.experimental.pallas.ops.tpu import flash_attention as flash

    qh, kh, vh, segments = _blocked(q, k, v, keys, masked, flash.SegmentIds)
    out = flash.flash_attention(qh, kh, vh, segment_ids=segments, sm_scale=1.0 / math.sqrt(q.shape[-1]))
    return out.transpose(0, 2, 1, 3)[:, : q.shape[1]]


def _tpu_splash_local(q: jax.Array, k: jax.Array, v: jax.Array, keys: jax.Array, masked: bool) -> jax.Array:
    """The splash kernel on one shard: a full mask (ViTDet's windows are already batch rows; their padding is
    kept out by segment ids), blocks of up to SPLASH_BLOCK tokens, per example (vmap over the batch)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    qh, kh, vh, segments = _blocked(q * (1.0 / math.sqrt(q.shape[-1])), k, v, keys, masked, splash.SegmentIds)
    (heads, q_pad), k_pad = qh.shape[1:3], kh.shape[2]
    block_q, block_kv = (math.gcd(n, SPLASH_BLOCK) for n in (q_pad, k_pad))
    sizes = splash.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    kernel = splash.make_splash_mha(
        mask=masks.MultiHeadMask([masks.FullMask((q_pad, k_pad))] * heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
    )
    out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=s))(qh, kh, vh, segments)
    return out.transpose(0, 2, 1, 3)[:, : q.shape[1]]


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
