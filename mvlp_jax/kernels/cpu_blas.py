"""Float32 GEMMs and attention on CPU through MKL (`blas_matmul`, `mkl_attention`): part of the CPU backend
(`backend.select` decides when a program takes them; no model file calls them).

XLA:CPU runs the (batch x heads)-batched small matmuls of attention on one thread, and its softmax makes
four passes over a (B, H, Q, K) tensor; on some machines its GEMMs also trail MKL's (800x768 @ 768x3072:
325 vs 390 GFLOP/s on one 2-core AVX-512 machine; on another XLA's were the faster, so `gemm_choice`
times the two for dense layers). These go to MKL through XLA FFI custom calls (mkl_kernels.cc, built when the
package is installed), on XLA's own thread pool; MKL itself comes from the `mkl` package (the `cpu` extra).

When: see `backend`. Without the built kernels or MKL, programs run on XLA's ops, after one warning.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import math
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

TARGETS = {
    "mvlp_gemm": "MvlpGemm",
    "mvlp_attention_fwd": "MvlpAttentionFwd",
    "mvlp_attention_bwd": "MvlpAttentionBwd",
}  # FFI target -> handler symbol
SOURCE = pathlib.Path(__file__).with_name("mkl_kernels.cc")
KERNEL_MODULE = "mvlp_jax.kernels._mkl_kernels"  # built from SOURCE by setup.py
MKL_SYMBOLS = ("sgemm_", "mkl_set_num_threads_local_", "vsExp")
MODES = ("auto", "on", "off")
_provider = ""  # the file name of the MKL library `load` took


def mode() -> str:
    value = os.environ.get("MVLP_JAX_CPU_BLAS", "auto").lower()
    if value not in MODES:
        raise ValueError(f"MVLP_JAX_CPU_BLAS={value!r}; choose one of {MODES}")
    return value


def mkl_candidates() -> list[pathlib.Path]:
    """Libraries that may export MKL_SYMBOLS, most explicit first: MVLP_JAX_BLAS_LIB, then the `mkl` package of
    the `cpu` extra (libmkl_rt in the environment's lib/, newest soname first)."""
    paths = [pathlib.Path(p) for p in [os.environ.get("MVLP_JAX_BLAS_LIB")] if p]
    paths += sorted((pathlib.Path(sys.prefix) / "lib").glob("libmkl_rt.so.*"), reverse=True)
    return [p for p in paths if p.exists()]


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MVLP_JAX_CACHE", pathlib.Path.home() / ".cache" / "mvlp_jax"))


def kernel_library() -> pathlib.Path | None:
    """The kernels built from mkl_kernels.cc when the package was installed (setup.py), or None."""
    spec = importlib.util.find_spec(KERNEL_MODULE)
    return pathlib.Path(spec.origin) if spec and spec.origin else None


@functools.cache
def load() -> bool:
    """Register the FFI targets once per process; False (and one warning naming the fix) when impossible."""
    try:
        library = kernel_library()
        if library is None:
            raise RuntimeError(
                f"{KERNEL_MODULE} was not built at install time (no C++ compiler then?): reinstall with one"
            )
        found = next((p for p in mkl_candidates() if _exports_mkl(p)), None)
        mkl = None if found is None else ctypes.CDLL(str(found))
        if mkl is None:
            raise RuntimeError(
                "no MKL found: pip install 'mvlp_jax[cpu]' (or set MVLP_JAX_BLAS_LIB=/path/libmkl_rt.so)"
            )
        kernel = ctypes.CDLL(str(library))
        kernel.mvlp_mkl_init(*(ctypes.cast(getattr(mkl, name), ctypes.c_void_p) for name in MKL_SYMBOLS))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(kernel, symbol)), platform="cpu")
        global _provider
        _provider = found.resolve().name
        return True
    except (OSError, RuntimeError) as error:
        logging.warning("CPU programs run on XLA's own ops (MKL kernels unavailable: %s)", error)
        return False


def provider() -> str:
    """The MKL library the kernels call (its file name, e.g. libmkl_rt.so.3); '' until `load` found one."""
    return _provider


def _exports_mkl(path: pathlib.Path) -> bool:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return False
    return all(hasattr(lib, name) for name in MKL_SYMBOLS)


def _require() -> None:
    if not load():
        raise RuntimeError("the MKL kernels are unavailable here (see the warning above)")


def blas_matmul(a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
    """op(a) @ op(b) over shared leading batch axes by MKL: a (..., M, K) or (..., K, M) when transpose_a,
    b (..., K, N) or (..., N, K) when transpose_b. float32 on CPU only; the backend decides when."""
    _require()
    batch = a.shape[:-2]
    if b.shape[:-2] != batch:
        raise ValueError(f"batch axes differ: {a.shape} and {b.shape}")
    m = a.shape[-1] if transpose_a else a.shape[-2]
    n = b.shape[-2] if transpose_b else b.shape[-1]
    groups = 1
    for size in batch:
        groups *= size
    out = jax.ffi.ffi_call("mvlp_gemm", jax.ShapeDtypeStruct((groups, m, n), jnp.float32))(
        a.reshape((groups,) + a.shape[-2:]),
        b.reshape((groups,) + b.shape[-2:]),
        transpose_a=transpose_a,
        transpose_b=transpose_b,
    )
    return out.reshape(batch + (m, n))


@jax.custom_vjp
def mkl_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v per head, without a mask, on (B, L, H, D) tensors (length-major: the
    projections' own layout); float32 on CPU only, the backend decides when."""
    return _attention_fwd(q, k, v)[0]


def _attention_fwd(q, k, v):
    _require()
    (b, q_len, h, d), k_len = q.shape, k.shape[1]
    out, weights = jax.ffi.ffi_call(
        "mvlp_attention_fwd",
        (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, q_len, k_len), jnp.float32)),
    )(q, k, v, scale=np.float32(1.0 / math.sqrt(d)))
    return out, (q, k, v, weights, out)


def _attention_bwd(residuals, d_out):
    q, k, v, weights, out = residuals
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    return jax.ffi.ffi_call("mvlp_attention_bwd", shapes)(
        q, k, v, weights, out, d_out, scale=np.float32(1.0 / math.sqrt(q.shape[-1]))
    )


mkl_attention.defvjp(_attention_fwd, _attention_bwd)
