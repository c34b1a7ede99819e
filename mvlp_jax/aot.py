"""`python -m mvlp_jax.aot`: Compile the training program for a TPU slice or GPUs ahead of time
(mvlp_jax/pretrain/aot.py)."""

from mvlp_jax.pretrain import aot as binary

if __name__ == "__main__":
    binary.run_binary()
