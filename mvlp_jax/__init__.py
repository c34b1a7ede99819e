"""Medical vision-language pretraining in JAX/Flax."""

from mvlp_jax.runtime import distributed as _distributed
from mvlp_jax.runtime import storage as _storage  # noqa: F401 - picks the gs:// file layer before any path is touched

_distributed.choose_platforms()  # before JAX starts a backend: no libtpu where there is no TPU
