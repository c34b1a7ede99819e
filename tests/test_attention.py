"""Attention, one function with several implementations: each that can run here equals the plain softmax formula
(values and gradients), with and without the masks the models use; the choice follows the backend.

The Pallas TPU kernel runs in Pallas's HLO interpreter (the kernel's program as a scan of XLA ops on CPU). Its
threaded TPU simulator (`pltpu.force_tpu_interpret_mode`) hung now and then in a process that had run other
programs, so these tests set the same switch to the plain interpreter."""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import config as jax_config

from mvlp_jax import kernels
from mvlp_jax.kernels import attention_ops as attention_lib
from mvlp_jax.kernels import backend, cpu_blas
from mvlp_jax.models.transformer import Block
from mvlp_jax.models.vitdet import window_partition, window_unpartition

CPU_MKL = backend.Backend("cpu", 1, mkl=True, mkl_gemm=False)


@contextlib.contextmanager
def pallas_interpreted():
    """Pallas kernels traced inside run in the HLO interpreter (jax's private switch for its TPU interpreter)."""
    previous = jax_config.pallas_tpu_interpret_mode_context_manager.swap_local(True)
    try:
        yield
    finally:
        jax_config.pallas_tpu_interpret_mode_context_manager.set_local(previous)


def plain(q, k, v, mask=None):
    """softmax(q k^T / sqrt(D)) v on length-major (B, L, H, D) inputs, autodiff's backward: the reference."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    logits = logits if mask is None else jnp.where(mask, logits, -1e30)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def _inputs(q_len, k_len, heads=2, dim=8, batch=2):
    keys = jax.random.split(jax.random.key(0), 3)
    return (
        jax.random.normal(keys[0], (batch, q_len, heads, dim)),
        jax.random.normal(keys[1], (batch, k_len, heads, dim)),
        jax.random.normal(keys[2], (batch, k_len, heads, dim)),
    )


def _key_mask(batch, k_len, valid):
    return (jnp.arange(k_len) < valid)[None, None, None, :].repeat(batch, axis=0)


def _value_and_grads(attend, q, k, v):
    loss = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v)))  # a non-trivial output cotangent
    return attend(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_matches_plain(implementation, q, k, v, mask, tol=1e-5):
    got, got_grads = _value_and_grads(lambda q, k, v: kernels.attention(q, k, v, mask, implementation), q, k, v)
    want, want_grads = _value_and_grads(lambda q, k, v: plain(q, k, v, mask), q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("mask_kind", ["none", "keys", "general"])
def test_xla_attention_equals_the_plain_formula(mask_kind):
    q, k, v = _inputs(7, 7)
    mask = {
        "none": None,
        "keys": _key_mask(2, 7, 5),
        "general": jax.random.bernoulli(jax.random.key(3), 0.7, (2, 1, 7, 7)).at[..., 0].set(True),
    }[mask_kind]
    _assert_matches_plain("xla", q, k, v, mask)
    bf16 = _value_and_grads(
        lambda q, k, v: kernels.attention(q, k, v, mask, "xla"), *(x.astype(jnp.bfloat16) for x in (q, k, v))
    )[1]
    assert all(g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g).all()) for g in bf16)


@pytest.mark.skipif(not cpu_blas.mkl_candidates(), reason="no MKL on this machine")
def test_mkl_attention_equals_the_plain_formula_and_masks_fall_back_to_xla():
    q, k, v = _inputs(3, 7)  # cross attention, a pooling probe's shape
    with backend.use(CPU_MKL):
        assert attention_lib.choose("auto", q, k, None) == "mkl"
        assert attention_lib.choose("auto", q, k, _key_mask(2, 7, 5)) == "xla"
        assert attention_lib.choose("auto", q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), None) == "xla"
        _assert_matches_plain("auto", q, k, v, None)
        hlo = jax.jit(lambda q, k, v: kernels.attention(q, k, v)).lower(q, k, v).as_text()
    assert "mvlp_attention_fwd" in hlo


@pytest.mark.parametrize("kernel", ["tpu_flash", "tpu_splash"])
@pytest.mark.parametrize("mask_kind", ["none", "keys", "general"])
def test_tpu_kernels_equal_the_plain_formula(mask_kind, kernel):
    """Each Pallas TPU kernel, interpreted: lengths that are not whole 128-token blocks (padded), a key mask
    (segment ids), and a mask it cannot express (the XLA formula runs instead); `auto` takes splash."""
    q, k, v = _inputs(130, 200, heads=2, dim=16, batch=1)
    mask = {"none": None, "keys": _key_mask(1, 200, 150), "general": jnp.tril(jnp.ones((130, 200), bool))[None, None]}[
        mask_kind
    ]
    with backend.use(backend.Backend("tpu", 4)):
        assert attention_lib.choose("auto", q, k, mask) == ("xla" if mask_kind == "general" else "tpu_splash")
        assert attention_lib.choose(kernel, q, k, mask) == ("xla" if mask_kind == "general" else kernel)
        assert attention_lib.choose("auto", q[:, :3], k, mask) == "xla"  # too short for a block
    with pallas_interpreted():
        _assert_matches_plain(kernel, q, k, v, mask, tol=2e-5)


@pytest.mark.parametrize("kernel", ["tpu_flash", "tpu_splash"])
def test_vitdet_windows_on_the_tpu_kernels_equal_xla(kernel):
    """A ViTDet block on padded 14 x 14 windows (196 tokens, padded to 256 with a key mask): same outputs and
    gradients with each TPU kernel as with XLA's formula."""
    grid, window, width = (16, 15), 14, 32
    tokens = jax.random.normal(jax.random.key(1), (1, grid[0] * grid[1], width))
    windows, mask = window_partition(tokens, grid, window)
    results = {}
    for implementation in ("xla", kernel):
        block = Block(num_heads=2, mlp_dim=64, attention=implementation)
        params = Block(num_heads=2, mlp_dim=64).init(jax.random.key(0), windows)

        def loss(p, x, block=block):
            out = window_unpartition(block.apply(p, x, 0.0, mask)[0], 1, grid, window)
            return jnp.sum(jnp.sin(out)), out

        with pallas_interpreted():
            results[implementation] = jax.value_and_grad(loss, has_aux=True)(params, windows)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5),
        results[kernel],
        results["xla"],
    )


def test_auto_follows_the_backend_and_a_kernel_for_another_platform_is_refused():
    q, k, _ = _inputs(200, 200)
    q16, k16 = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    with backend.use(backend.Backend("gpu", 8)):
        assert attention_lib.choose("auto", q16, k16, None) == "cudnn"
        assert attention_lib.choose("auto", q, k, None) == "xla"  # cuDNN runs bfloat16 / float16 only
    with backend.use(backend.Backend("cpu", 8)):  # several CPU devices: no MKL
        assert attention_lib.choose("auto", q, k, None) == "xla"
        with pytest.raises(ValueError, match="'tpu_flash' runs on tpu devices; this program is for cpu"):
            attention_lib.choose("tpu_flash", q, k, None)
    with backend.use(backend.Backend("tpu", 8)):
        with pytest.raises(ValueError, match="'cudnn' runs on gpu devices"):
            attention_lib.choose("cudnn", q16, k16, None)
    assert attention_lib.choose("auto", q, k, None) == "xla"  # outside a backend: the portable formula
    with pytest.raises(ValueError, match="choose one of"):
        attention_lib.choose("flash", q, k, None)


@pytest.mark.parametrize("mask_kind", ["none", "keys", "general"])
def test_the_cudnn_call_pads_odd_lengths_and_keeps_the_padding_out(mask_kind, monkeypatch):
    """What mvlp_jax hands cuDNN (odd lengths padded by one token, kept out by sequence lengths or the mask; a key
    mask broadcast over the queries) gives the plain formula's values and gradients, with cuDNN's kernel stood in
    by jax's XLA implementation of the same call (no GPU here: tests/test_gpu_compile.py compiles the real one)."""
    original = jax.nn.dot_product_attention
    calls = []

    def stand_in(*args, implementation, **kwargs):
        assert implementation == "cudnn" and args[0].shape[1] % 2 == 0 and args[1].shape[1] % 2 == 0
        calls.append(kwargs)
        return original(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    q, k, v = (x.astype(jnp.bfloat16) for x in _inputs(7, 9, dim=16))
    mask = {
        "none": None,
        "keys": _key_mask(2, 9, 6),
        "general": jax.random.bernoulli(jax.random.key(3), 0.7, (2, 2, 7, 9)).at[..., 0].set(True),
    }[mask_kind]
    with backend.use(backend.Backend("gpu", 1)):
        assert attention_lib.choose("auto", q, k, mask) == "cudnn"
        got, got_grads = _value_and_grads(lambda q, k, v: kernels.attention(q, k, v, mask, "auto"), q, k, v)
    want, want_grads = _value_and_grads(lambda q, k, v: plain(q, k, v, mask), q, k, v)
    assert calls and ("query_seq_lengths" in calls[0]) == (mask is None)
    for a, b in zip((got, *got_grads), (want, *want_grads)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2)


def test_a_call_cudnn_cannot_take_runs_xla_and_the_log_says_so_once(caplog):
    q, k, _ = _inputs(8, 8, dim=12)  # heads of 12: not a multiple of 8
    q16, k16 = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    with caplog.at_level("WARNING"), backend.use(backend.Backend("gpu", 1)):
        assert [attention_lib.choose("auto", q16, k16, None) for _ in range(3)] == ["xla"] * 3
    said = [r.getMessage() for r in caplog.records if "attention: cudnn" in r.getMessage()]
    assert len(said) == 1 and "heads of 12" in said[0], said


def test_sown_weights_are_the_softmax():
    q, k, _ = _inputs(3, 7)
    mask = _key_mask(2, 7, 4)
    weights = kernels.attention_weights(q, k, mask)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
    np.testing.assert_allclose(
        np.asarray(weights), np.asarray(jax.nn.softmax(jnp.where(mask, logits, -1e30))), rtol=1e-6, atol=1e-7
    )
    assert weights.shape == (2, 2, 3, 7) and float(weights[..., 4:].max()) == 0.0
