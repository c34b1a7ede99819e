"""Medical vision-language pretraining in JAX/Flax."""
from mvlp_jax import storage as _storage  # noqa: F401 - picks the gs:// file layer before any path is touched
