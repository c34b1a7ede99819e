"""Which library runs this machine's dense-layer GEMMs: MKL (`cpu_blas.blas_matmul`) or XLA's own dot.

Neither wins everywhere. On one 2-core AVX-512 machine MKL's sgemm ran 800x768 @ 768x3072 at 390 GFLOP/s
against XLA's 325; on another (AMD EPYC, Zen 4) XLA's dots ran the MAE B/16 shapes at 176-202 GFLOP/s and
MKL's at 111-182. So `backend.select`, for a single CPU device, times both on two of MAE's shapes and keeps
the faster, once per machine: the choice and its timings are stored in the
kernel cache (`cpu_blas.cache_dir()`, keyed by CPU, core count, jaxlib, kernel source and MKL library), so every later
process, and a resumed run, takes the same path. MVLP_JAX_CPU_GEMM=mkl or =xla skips the timing.
Attention's fused kernel is not part of this choice: XLA has no fused CPU attention to weigh it against.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from mvlp_jax.kernels import cpu_blas

CHOICES = ("mkl", "xla")
SHAPES = ((3152, 512, 2048), (800, 768, 768))  # (M, K, N): MAE B/16's decoder fc1 and encoder q/k/v
# MKL wins where its GEMMs time faster at all. A 3% handicap (for XLA's fusions) once sent an Intel Xeon with AMX,
# where the two tie on MAE's large GEMM (21.8 vs 22.0 ms) and MKL leads the small one (3.45 vs 4.25 ms), to XLA:
# its whole B/16 step then ran 0.85x PyTorch's against 1.01-1.05x on MKL's GEMMs (benchmarks/encoder_throughput).
MKL_MARGIN = 1.0


def gemm_backend() -> str:
    """'mkl' or 'xla': MVLP_JAX_CPU_GEMM if set, else the stored choice for this machine, timed once."""
    forced = os.environ.get("MVLP_JAX_CPU_GEMM", "").lower()
    if forced and forced not in CHOICES:
        raise ValueError(f"MVLP_JAX_CPU_GEMM={forced!r}; choose one of {CHOICES}")
    return forced or stored_backend()


@functools.cache
def stored_backend() -> str:
    path = cpu_blas.cache_dir() / f"gemm-choice-{machine_key()}.json"
    try:
        stored = json.loads(path.read_text())["backend"]
        if stored in CHOICES:
            return stored
    except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: time again and rewrite it
        pass
    record = time_backends()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)  # concurrent first runs each write a whole file
    logging.info("CPU GEMMs on %s (timed once, stored in %s)", record["backend"], path)
    return record["backend"]


def machine_key() -> str:
    cpu = next((line for line in _cpuinfo().splitlines() if line.startswith("model name")), platform.processor())
    import jaxlib

    identity = [cpu, str(os.cpu_count()), jaxlib.__version__, cpu_blas.SOURCE.read_text(), cpu_blas.provider()]
    return hashlib.sha256("\n".join(identity).encode()).hexdigest()[:16]


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def time_backends(repeats: int = 5) -> dict:
    """Best-of-`repeats` seconds of each backend on SHAPES, alternating so a noisy neighbour slows both."""
    with jax.ensure_compile_time_eval():  # run now even if first asked for inside a trace
        rng = np.random.default_rng(0)
        draw = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
        operands = [(draw(m, k), draw(k, n)) for m, k, n in SHAPES]
        runs = {"mkl": jax.jit(cpu_blas.blas_matmul), "xla": jax.jit(jnp.matmul)}
        best = {name: [float("inf")] * len(SHAPES) for name in runs}
        for _ in range(repeats + 1):  # the first round compiles and warms up
            for name, run in runs.items():
                for i, (a, b) in enumerate(operands):
                    start = time.perf_counter()
                    run(a, b).block_until_ready()
                    best[name][i] = min(best[name][i], time.perf_counter() - start)
    mkl, xla = sum(best["mkl"]), sum(best["xla"])
    return {"backend": "mkl" if mkl < MKL_MARGIN * xla else "xla", "seconds": best, "shapes": [list(s) for s in SHAPES]}
