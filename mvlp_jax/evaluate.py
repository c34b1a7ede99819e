"""`python -m mvlp_jax.evaluate`: The evaluation binary (mvlp_jax/evaluation/evaluate.py)."""

from mvlp_jax.evaluation import evaluate as binary

if __name__ == "__main__":
    binary.run_binary()
