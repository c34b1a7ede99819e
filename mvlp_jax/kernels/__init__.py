"""The one seam between model code and the platform: operations whose fastest form depends on the device.

Model files call these and nothing platform-specific; `backend` says, per program, what the devices it is
compiled for can run (chosen once, outside tracing, from the mesh), and each operation takes the fastest
implementation it allows with the same values:
- `attention` / `attention_weights`: XLA's formula, the Pallas TPU flash kernel, cuDNN's fused attention, or
  MKL's CPU kernel (`attention_ops.py`);
- `matmul` / `dense_dot_general` / `patch_conv`: dense layers and the patch embedding, on XLA's dots or
  MKL's GEMMs (`linear.py`, `cpu_blas.py`, `gemm_choice.py`);
- `compute_dtype`: a config's 'auto' dtype for the platform.
"""

from mvlp_jax.kernels.attention_ops import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from mvlp_jax.kernels.attention_ops import attention, attention_weights
from mvlp_jax.kernels.backend import compute_dtype
from mvlp_jax.kernels.linear import dense_dot_general, matmul, patch_conv, patchify

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "attention",
    "attention_weights",
    "compute_dtype",
    "dense_dot_general",
    "matmul",
    "patch_conv",
    "patchify",
]
