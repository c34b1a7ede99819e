"""Dense-layer GEMMs (`matmul`, `dense_dot_general`) and the patch embedding (`patch_conv`): the same values and
gradients as autodiff on every platform, in the form each platform runs fastest.

Where the backend says so (`backend.current().mkl_gemm`: float32 on a single CPU device of a machine whose MKL
beats XLA's dots), all three GEMMs (forward, input and weight gradient) go to MKL. Otherwise XLA's dots run,
with one change to autodiff's form: autodiff writes a dense layer's weight gradient as x^T g, a dot
contracting the leading (token) axis of both operands, which XLA:CPU hands to Eigen instead of YNNPACK and
runs ~25% slower than the same GEMM on row-major operands (MAE B/16 decoder fc1, 3152 tokens x 512 -> 2048: 52
vs 39 ms). On CPU that backward transposes the smaller operand first (a copy of a few MB) and keeps the
transpose from being folded back into the dot; other platforms take autodiff's form, which their compilers
handle natively.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mvlp_jax.kernels import backend
from mvlp_jax.kernels.cpu_blas import blas_matmul


def _mkl(*operands: jax.Array) -> bool:
    return backend.current().mkl_gemm and all(x.dtype == jnp.float32 for x in operands)


def _weight_grad_cpu(x: jax.Array, g: jax.Array) -> jax.Array:
    """x (N, K), g (N, M) -> x^T g (K, M) from non-transposed GEMMs (optimization barriers pin the layout)."""
    barrier = jax.lax.optimization_barrier
    if x.shape[1] <= g.shape[1]:
        return barrier(x.T) @ g
    return barrier(barrier(g.T) @ x).T


def _weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
    return jnp.einsum("nk,nm->km", x, g)


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (..., K) @ kernel (K, M); same values and gradients as autodiff, faster GEMMs on CPU (MKL where the
    backend takes it, else XLA's dot with the weight gradient in the form above)."""
    if _mkl(x, kernel):
        return blas_matmul(x.reshape(-1, x.shape[-1]), kernel).reshape(x.shape[:-1] + kernel.shape[1:])
    return x @ kernel


def _matmul_fwd(x: jax.Array, kernel: jax.Array):
    return matmul(x, kernel), (x, kernel)


def _matmul_bwd(residuals, g: jax.Array):
    x, kernel = residuals
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    if _mkl(x, kernel, g):
        return blas_matmul(g2, kernel, transpose_b=True).reshape(x.shape), blas_matmul(x2, g2, transpose_a=True)
    d_x = jnp.einsum("...m,km->...k", g, kernel)
    d_kernel = jax.lax.platform_dependent(x2, g2, cpu=_weight_grad_cpu, default=_weight_grad)
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(
    lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None, preferred_element_type=None
) -> jax.Array:
    """`dot_general` for flax's nn.Dense (its contraction: lhs's last axis with kernel's first) via `matmul`;
    any other contraction, precision or result type goes to lax.dot_general unchanged."""
    dense_form = (((lhs.ndim - 1,), (0,)), ((), ()))
    if (
        (tuple(map(tuple, dimension_numbers[0])), tuple(map(tuple, dimension_numbers[1]))) != dense_form
        or rhs.ndim != 2
        or precision is not None
        or preferred_element_type is not None
    ):
        return jax.lax.dot_general(
            lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
        )
    return matmul(lhs, rhs)


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p * W/p, p*p*C), patch pixels ordered (row, col, channel) as MAE."""
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch}")
    x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def patch_conv(images: jax.Array, kernel: jax.Array) -> jax.Array:
    """Conv with kernel = stride = patch, VALID padding: images (B, H, W, C), kernel (p, p, C, D) -> (B, H/p,
    W/p, D). On MKL's GEMMs, one GEMM on patchified pixels (XLA:CPU's strided conv: MAE B/16, 32 ms forward,
    24 ms kernel gradient, against ~8 ms for the GEMM); elsewhere the convolution, which TPU and GPU run as is."""
    p = kernel.shape[0]
    if _mkl(images, kernel):
        b, h, w, _ = images.shape
        y = matmul(patchify(images, p), kernel.reshape(-1, kernel.shape[-1]))
        return y.reshape(b, h // p, w // p, kernel.shape[-1])
    return jax.lax.conv_general_dilated(images, kernel, (p, p), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
