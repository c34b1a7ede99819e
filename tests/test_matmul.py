"""matmul's custom backward: the gradients of x @ kernel, with the weight gradient as a plain GEMM on CPU."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvlp_jax.kernels.linear import _weight_grad, _weight_grad_cpu, dense_dot_general, matmul


def _loss(mm, x, kernel, g):
    return jnp.sum(mm(x, kernel) * g)


@pytest.mark.parametrize("k,m", [(24, 40), (40, 24)])  # transposes x, or the cotangent, first
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradients_equal_autodiff(k, m, dtype):
    rng = np.random.default_rng(0)
    x, kernel, g = (jnp.asarray(rng.normal(size=s), dtype) for s in [(3, 10, k), (k, m), (3, 10, m)])
    ours = jax.jit(jax.grad(lambda x, w: _loss(matmul, x, w, g), argnums=(0, 1)))(x, kernel)
    plain = jax.jit(jax.grad(lambda x, w: _loss(jnp.matmul, x, w, g), argnums=(0, 1)))(x, kernel)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(ours, plain):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
    np.testing.assert_array_equal(matmul(x, kernel), x @ kernel)


@pytest.mark.parametrize("k,m", [(24, 40), (40, 24)])
def test_both_weight_gradient_forms_equal_the_definition(k, m):
    rng = np.random.default_rng(1)
    x, g = jnp.asarray(rng.normal(size=(30, k)), jnp.float32), jnp.asarray(rng.normal(size=(30, m)), jnp.float32)
    expected = np.asarray(x, np.float64).T @ np.asarray(g, np.float64)
    for form in (_weight_grad_cpu, _weight_grad):
        np.testing.assert_allclose(jax.jit(form)(x, g), expected, rtol=1e-5, atol=1e-5)


def _dots_contracting_leading_axes(hlo: str) -> list[str]:
    return [
        line
        for line in hlo.splitlines()
        if " dot(" in line and re.search(r"lhs_contracting_dims=\{0\}.*rhs_contracting_dims=\{0\}", line)
    ]


def test_cpu_backward_has_no_dot_contracting_the_token_axis():
    """The point of the module: autodiff's x^T g (both operands contracted on axis 0) is gone on CPU."""
    x, kernel, g = jnp.ones((64, 32)), jnp.ones((32, 48)), jnp.ones((64, 48))
    compile_grad = lambda mm: jax.jit(jax.grad(lambda w: _loss(mm, x, w, g))).lower(kernel).compile().as_text()
    assert _dots_contracting_leading_axes(compile_grad(jnp.matmul)), "autodiff's form changed; revisit matmul.py"
    assert not _dots_contracting_leading_axes(compile_grad(matmul))


def test_dense_with_dense_dot_general_is_nn_dense():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 8)), jnp.float32)
    ours, plain = nn.Dense(6, dot_general=dense_dot_general), nn.Dense(6)
    params = plain.init(jax.random.key(0), x)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(params)
    np.testing.assert_array_equal(ours.apply(params, x), plain.apply(params, x))
    grads = [jax.grad(lambda p, m=m: jnp.sum(m.apply(p, x) ** 2))(params) for m in (ours, plain)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads)
    # any other contraction (here a batched one) goes to lax.dot_general unchanged
    batched, dims = jnp.ones((2, 8, 3)), (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(dense_dot_general(x, batched, dims), jax.lax.dot_general(x, batched, dims))
