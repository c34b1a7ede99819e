"""Hand-written kernels that XLA calls through its FFI (CPU only; every other platform keeps XLA's ops)."""
