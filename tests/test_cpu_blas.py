"""The MKL GEMM path on CPU: products against numpy, a whole MAE step against XLA's own dots, and when it is taken."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvlp_jax.kernels import cpu_blas
from mvlp_jax.models.vit import MAE, ViT

pytestmark = pytest.mark.skipif(not cpu_blas.mkl_candidates(), reason="no MKL on this machine")


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("batch,m,k,n", [((), 300, 33, 70),   # one GEMM split into row blocks
                                         ((), 40, 17, 300),   # ... into column blocks
                                         ((), 5, 0, 3),       # empty contraction: zeros
                                         ((3,), 20, 9, 11), ((2, 5), 7, 6, 4)])  # batches split into slices
def test_blas_matmul_equals_numpy(transpose_a, transpose_b, batch, m, k, n):
    rng = np.random.default_rng(0)
    a = rng.normal(size=batch + ((k, m) if transpose_a else (m, k))).astype(np.float32)
    b = rng.normal(size=batch + ((n, k) if transpose_b else (k, n))).astype(np.float32)
    expected = np.matmul(np.swapaxes(a, -1, -2) if transpose_a else a,
                         np.swapaxes(b, -1, -2) if transpose_b else b, dtype=np.float64)
    got = jax.jit(lambda a, b: cpu_blas.blas_matmul(a, b, transpose_a, transpose_b))(a, b)
    assert got.shape == batch + (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _mae_step(monkeypatch, setting: str, gemm: str = "mkl"):
    """MAE loss and gradients, and the compiled step's HLO, with MVLP_JAX_CPU_BLAS=setting and
    MVLP_JAX_CPU_GEMM=gemm."""
    monkeypatch.setenv("MVLP_JAX_CPU_BLAS", setting)
    monkeypatch.setenv("MVLP_JAX_CPU_GEMM", gemm)
    model = MAE(ViT(width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=8), decoder_width=32,
                decoder_depth=2, decoder_heads=4, decoder_mlp_dim=64)
    images = jax.random.normal(jax.random.key(0), (3, 32, 32, 1))
    params = model.init({"params": jax.random.key(1), "masking": jax.random.key(2)}, images)["params"]
    loss = lambda p: model.apply({"params": p}, images, rngs={"masking": jax.random.key(3)})["loss"]
    step = jax.jit(jax.value_and_grad(loss))  # a new function: traced afresh under this setting
    return step(params), step.lower(params).compile().as_text()


@pytest.mark.parametrize("gemm", ["mkl", "xla"])
def test_mae_step_on_mkl_equals_xla_dots(monkeypatch, gemm):
    """MKL attention with MKL's or XLA's GEMMs (gemm_choice) against XLA's ops alone."""
    (loss_mkl, grads_mkl), hlo_mkl = _mae_step(monkeypatch, "on", gemm)
    (loss_xla, grads_xla), hlo_xla = _mae_step(monkeypatch, "off")
    calls = lambda hlo, target: hlo.count(f'custom_call_target="{target}"')
    assert calls(hlo_mkl, "mvlp_attention_bwd") == 4  # each path was taken
    assert calls(hlo_mkl, "mvlp_gemm") >= 20 if gemm == "mkl" else calls(hlo_mkl, "mvlp_gemm") == 0
    assert not any(calls(hlo_xla, target) for target in cpu_blas.TARGETS)
    np.testing.assert_allclose(loss_mkl, loss_xla, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads_mkl, grads_xla)


def test_when_the_mkl_path_is_taken(monkeypatch):
    x32, x16 = jnp.ones((4, 4)), jnp.ones((4, 4), jnp.bfloat16)
    monkeypatch.setenv("MVLP_JAX_CPU_BLAS", "auto")
    assert jax.device_count() == 8 and not cpu_blas.use_blas(x32)  # sharded programs keep XLA's dots
    monkeypatch.setenv("MVLP_JAX_CPU_BLAS", "on")
    assert cpu_blas.use_blas(x32) and not cpu_blas.use_blas(x32, x16)
    monkeypatch.setenv("MVLP_JAX_CPU_BLAS", "off")
    assert not cpu_blas.use_blas(x32)
    monkeypatch.setenv("MVLP_JAX_CPU_BLAS", "yes")
    with pytest.raises(ValueError, match="MVLP_JAX_CPU_BLAS"):
        cpu_blas.use_blas(x32)


def test_without_mkl_it_falls_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("MVLP_JAX_CPU_BLAS", "on")
    monkeypatch.setattr(cpu_blas, "mkl_candidates", lambda: [])
    cpu_blas.load.cache_clear()
    try:
        assert not cpu_blas.use_blas(jnp.ones(3))
        assert "no MKL found" in caplog.text
    finally:
        cpu_blas.load.cache_clear()


def test_kernel_builds_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MVLP_JAX_CACHE", str(tmp_path))
    built = cpu_blas.build_kernel()
    assert built.parent == tmp_path and built.stat().st_size > 0 and cpu_blas.build_kernel() == built


@pytest.mark.parametrize("setting", ["on", "off"])
def test_patch_conv_is_nn_conv(monkeypatch, setting):
    """Same parameters (so checkpoints load) and outputs as the strided nn.Conv it replaces, on either path."""
    from flax import linen as nn

    from mvlp_jax.models.vit import PatchConv

    monkeypatch.setenv("MVLP_JAX_CPU_BLAS", setting)
    monkeypatch.setenv("MVLP_JAX_CPU_GEMM", "mkl")
    images = jax.random.normal(jax.random.key(0), (2, 24, 16, 3))
    conv = nn.Conv(8, (4, 4), strides=(4, 4), padding="VALID")
    params = conv.init(jax.random.key(1), images)
    ours = PatchConv(8, 4)
    jax.tree.map(np.testing.assert_array_equal, nn.unbox(ours.init(jax.random.key(1), images)), params)
    np.testing.assert_allclose(jax.jit(ours.apply)(params, images), conv.apply(params, images), rtol=1e-5, atol=1e-5)


def test_cross_attention_on_mkl_equals_xla_and_sows_the_same_weights(monkeypatch):
    """Queries and keys of different lengths (a pooling probe's case), outputs and sown attention maps."""
    from mvlp_jax.models.transformer import Attention

    queries, keys = jax.random.normal(jax.random.key(0), (2, 3, 16)), jax.random.normal(jax.random.key(1), (2, 7, 16))
    attention = Attention(num_heads=4, sow_weights=True)
    params = attention.init(jax.random.key(2), queries, keys)
    results = {}
    for setting in ("on", "off"):
        monkeypatch.setenv("MVLP_JAX_CPU_BLAS", setting)
        apply = jax.jit(lambda p, q, k: attention.apply(p, q, k, mutable=["intermediates"]))
        results[setting] = apply(params, queries, keys)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), results["on"], results["off"])
    assert results["on"][1]["intermediates"]["attention_weights"][0].shape == (2, 4, 3, 7)


def test_gemm_choice_is_timed_once_stored_and_reused(tmp_path, monkeypatch):
    from mvlp_jax.kernels import gemm_choice

    monkeypatch.setenv("MVLP_JAX_CACHE", str(tmp_path))
    monkeypatch.delenv("MVLP_JAX_CPU_GEMM", raising=False)
    gemm_choice.stored_backend.cache_clear()
    try:
        record = gemm_choice.time_backends(repeats=1)
        assert record["backend"] in gemm_choice.CHOICES and all(t > 0 for ts in record["seconds"].values() for t in ts)
        stored = tmp_path / f"gemm-choice-{gemm_choice.machine_key()}.json"
        chosen = gemm_choice.gemm_backend()  # times both and stores the choice
        assert json.loads(stored.read_text())["backend"] == chosen
        stored.write_text(json.dumps({"backend": "mkl"}))  # a later process reads the file, times nothing
        gemm_choice.stored_backend.cache_clear()
        monkeypatch.setattr(gemm_choice, "time_backends", lambda: pytest.fail("timed again"))
        monkeypatch.setenv("MVLP_JAX_CPU_BLAS", "on")
        assert gemm_choice.gemm_backend() == "mkl" and gemm_choice.use_mkl_gemm(jnp.ones(3))
        monkeypatch.setenv("MVLP_JAX_CPU_GEMM", "xla")  # the override wins over the stored choice
        assert gemm_choice.gemm_backend() == "xla" and not gemm_choice.use_mkl_gemm(jnp.ones(3))
        monkeypatch.setenv("MVLP_JAX_CPU_GEMM", "blas")
        with pytest.raises(ValueError, match="MVLP_JAX_CPU_GEMM"):
            gemm_choice.gemm_backend()
        monkeypatch.delenv("MVLP_JAX_CPU_GEMM")
        stored.write_text("{")  # a torn file is timed again and rewritten, not trusted or fatal
        gemm_choice.stored_backend.cache_clear()
        monkeypatch.setattr(gemm_choice, "time_backends", lambda: {"backend": "xla", "seconds": {}, "shapes": []})
        assert gemm_choice.gemm_backend() == "xla" and json.loads(stored.read_text())["backend"] == "xla"
    finally:
        gemm_choice.stored_backend.cache_clear()
