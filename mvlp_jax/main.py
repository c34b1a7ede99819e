"""`python -m mvlp_jax.main`: The pretraining binary (mvlp_jax/pretrain/main.py)."""

from mvlp_jax.pretrain import main as binary

if __name__ == "__main__":
    binary.run_binary()
