"""`python -m mvlp_jax.export`: Export a run's encoder to Hugging Face (mvlp_jax/tools/export.py)."""

from mvlp_jax.tools import export as binary

if __name__ == "__main__":
    binary.run_binary()
