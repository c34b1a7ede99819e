"""The hand-written LayerNorm against flax's nn.LayerNorm: parameters, values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvlp_jax.models.norm import LayerNorm


def _reference_and_ours(dtype):
    return (nn.LayerNorm(epsilon=1e-6, dtype=dtype, use_fast_variance=False), LayerNorm(epsilon=1e-6, dtype=dtype))


def test_same_parameters_values_and_gradients_as_nn_layernorm():
    reference, ours = _reference_and_ours(jnp.float32)
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 7, 48))  # a mean and spread to remove
    params = reference.init(jax.random.key(1), x)
    assert jax.tree.structure(nn.unbox(ours.init(jax.random.key(1), x))) == jax.tree.structure(params)
    keys = jax.random.split(jax.random.key(2), 3)
    params = {"params": {"scale": 1.0 + jax.random.normal(keys[0], (48,)), "bias": jax.random.normal(keys[1], (48,))}}
    weights = jax.random.normal(keys[2], x.shape)  # a loss whose gradient is not constant per row

    def loss(module, p, x):
        return jnp.sum(jnp.sin(module.apply(p, x)) * weights)

    np.testing.assert_allclose(jax.jit(ours.apply)(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-5)
    got = jax.jit(jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1)))(params, x)
    want = jax.grad(lambda p, x: loss(reference, p, x), argnums=(0, 1))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_compute_dtype_sets_the_output_and_float32_inputs_keep_their_gradient_dtype(dtype):
    reference, ours = _reference_and_ours(dtype)
    x = jax.random.normal(jax.random.key(0), (2, 5, 32))
    params = reference.init(jax.random.key(1), x)
    y = ours.apply(params, x)
    assert y.dtype == reference.apply(params, x).dtype == dtype
    np.testing.assert_allclose(y.astype(jnp.float32), reference.apply(params, x).astype(jnp.float32), atol=2e-2)
    d_x = jax.grad(lambda x: jnp.sum(ours.apply(params, x).astype(jnp.float32) ** 2))(x)
    assert d_x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(d_x)))
