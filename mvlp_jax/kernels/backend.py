"""The platform a program is compiled for, and what that platform's kernels may do: chosen once per device set,
outside tracing, from the devices of the mesh (never from the host process's backend, so a TPU program compiled
ahead of time on a CPU host never sees a CPU kernel).

`sharding.active(mesh)`, the context every trace in mvlp_jax runs under, enters `use(select(mesh devices))`.
Outside it the portable backend applies: XLA's own ops everywhere, the same values on every platform.

On a single CPU device the MKL kernels are loaded (float32 attention and batched GEMMs, `cpu_blas`) and the dense
GEMM library is chosen by timing once per machine (`gemm_choice`). MVLP_JAX_CPU_BLAS=off keeps XLA's ops, =on
takes MKL whatever the device count (a custom call has no sharding rule: only for single-device tests).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence

import jax.numpy as jnp

from mvlp_jax.kernels import cpu_blas, gemm_choice

PLATFORMS = {"cpu": "cpu", "tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}


@dataclasses.dataclass(frozen=True)
class Backend:
    platform: str  # "cpu", "gpu", "tpu", or "any" (portable: XLA's ops)
    devices: int = 1
    mkl: bool = False  # MKL's float32 attention and batched GEMMs (a single CPU device)
    mkl_gemm: bool = False  # dense-layer GEMMs through MKL too (where it is this machine's faster GEMM)


PORTABLE = Backend("any", 0)
_CURRENT: contextvars.ContextVar[Backend] = contextvars.ContextVar("mvlp_backend", default=PORTABLE)


def select(devices: Sequence) -> Backend:
    """The backend for a program on `devices` (loads MKL and times the GEMMs at most once per process)."""
    platform = PLATFORMS.get(devices[0].platform, devices[0].platform)
    return _select(platform, len(devices), cpu_blas.mode(), os.environ.get("MVLP_JAX_CPU_GEMM", ""))


@functools.cache
def _select(platform: str, devices: int, blas_mode: str, gemm_setting: str) -> Backend:
    del gemm_setting  # part of the cache key: gemm_choice reads it
    if platform != "cpu" or blas_mode == "off" or (blas_mode == "auto" and devices != 1) or not cpu_blas.load():
        return Backend(platform, devices)
    return Backend(platform, devices, mkl=True, mkl_gemm=gemm_choice.gemm_backend() == "mkl")


def current() -> Backend:
    """The backend of the program being traced (PORTABLE outside `use`)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use(backend: Backend) -> Iterator[Backend]:
    token = _CURRENT.set(backend)
    try:
        yield backend
    finally:
        _CURRENT.reset(token)


def compute_dtype(name: str) -> jnp.dtype:
    """A config's compute dtype; 'auto' is bfloat16 on TPU and GPU (their matrix units' type) and float32 on
    CPU (where bfloat16 runs slower) and outside a backend."""
    if name == "auto":
        return jnp.dtype(jnp.bfloat16 if current().platform in ("tpu", "gpu") else jnp.float32)
    return jnp.dtype(name)
