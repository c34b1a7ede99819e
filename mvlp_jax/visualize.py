"""`python -m mvlp_jax.visualize`: Pictures of what a checkpoint learned (mvlp_jax/pretrain/visualize.py)."""

from mvlp_jax.pretrain import visualize as binary

if __name__ == "__main__":
    binary.run_binary()
