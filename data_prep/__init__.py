"""Offline data preparation: dataset builders and the LLM text-embedding precompute job."""

from mvlp_jax.runtime import storage as _storage  # noqa: F401 - picks the gs:// file layer before any path is touched
