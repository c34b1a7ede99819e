"""Offline data preparation: dataset builders and the LLM text-embedding precompute job."""
