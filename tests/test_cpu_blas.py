"""The CPU backend's MKL path: products against numpy, a whole MAE step against XLA's own ops, and when the
backend takes it (chosen from the devices, once, outside tracing)."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvlp_jax.kernels import backend, cpu_blas
from mvlp_jax.models.vit import MAE, ViT

pytestmark = pytest.mark.skipif(not cpu_blas.mkl_candidates(), reason="no MKL on this machine")


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize(
    "batch,m,k,n",
    [
        ((), 300, 33, 70),  # one GEMM split into row blocks
        ((), 40, 17, 300),  # ... into column blocks
        ((), 5, 0, 3),  # empty contraction: zeros
        ((3,), 20, 9, 11),
        ((2, 5), 7, 6, 4),
    ],
)  # batches split into slices
def test_blas_matmul_equals_numpy(transpose_a, transpose_b, batch, m, k, n):
    rng = np.random.default_rng(0)
    a = rng.normal(size=batch + ((k, m) if transpose_a else (m, k))).astype(np.float32)
    b = rng.normal(size=batch + ((n, k) if transpose_b else (k, n))).astype(np.float32)
    expected = np.matmul(
        np.swapaxes(a, -1, -2) if transpose_a else a, np.swapaxes(b, -1, -2) if transpose_b else b, dtype=np.float64
    )
    got = jax.jit(lambda a, b: cpu_blas.blas_matmul(a, b, transpose_a, transpose_b))(a, b)
    assert got.shape == batch + (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _mkl_backend(gemm: str) -> backend.Backend:
    return backend.Backend("cpu", 1, mkl=True, mkl_gemm=gemm == "mkl")


def _mae_step(chosen: backend.Backend):
    """MAE loss and gradients, and the compiled step's HLO, traced under `chosen`."""
    model = MAE(
        ViT(width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=8),
        decoder_width=32,
        decoder_depth=2,
        decoder_heads=4,
        decoder_mlp_dim=64,
    )
    images = jax.random.normal(jax.random.key(0), (3, 32, 32, 1))
    params = model.init({"params": jax.random.key(1), "masking": jax.random.key(2)}, images)["params"]
    loss = lambda p: model.apply({"params": p}, images, rngs={"masking": jax.random.key(3)})["loss"]
    with backend.use(chosen):
        step = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    return step(params), step.as_text()


@pytest.mark.parametrize("gemm", ["mkl", "xla"])
def test_mae_step_on_mkl_equals_xla_ops(gemm):
    """MKL attention with MKL's or XLA's GEMMs (gemm_choice) against XLA's ops alone (the portable backend)."""
    (loss_mkl, grads_mkl), hlo_mkl = _mae_step(_mkl_backend(gemm))
    (loss_xla, grads_xla), hlo_xla = _mae_step(backend.PORTABLE)
    calls = lambda hlo, target: hlo.count(f'custom_call_target="{target}"')
    assert calls(hlo_mkl, "mvlp_attention_bwd") == 4  # each path was taken
    assert calls(hlo_mkl, "mvlp_gemm") >= 20 if gemm == "mkl" else calls(hlo_mkl, "mvlp_gemm") == 0
    assert not any(calls(hlo_xla, target) for target in cpu_blas.TARGETS)
    np.testing.assert_allclose(loss_mkl, loss_xla, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads_mkl, grads_xla)


def _devices(platform: str, count: int) -> list:
    return [types.SimpleNamespace(platform=platform)] * count


def test_the_backend_follows_the_devices_of_the_program(monkeypatch):
    monkeypatch.setenv("MVLP_JAX_CPU_GEMM", "xla")
    monkeypatch.setenv("MVLP_JAX_CPU_BLAS", "auto")
    assert backend.select(jax.devices()) == backend.Backend("cpu", 8)  # sharded programs keep XLA's ops
    assert backend.select(jax.devices()[:1]) == backend.Backend("cpu", 1, mkl=True)
    assert backend.select(_devices("tpu", 16)) == backend.Backend("tpu", 16)  # a TPU slice compiled from here
    assert backend.select(_devices("cuda", 1)) == backend.Backend("gpu", 1)
    monkeypatch.setenv("MVLP_JAX_CPU_GEMM", "mkl")
    assert backend.select(jax.devices()[:1]) == backend.Backend("cpu", 1, mkl=True, mkl_gemm=True)
    monkeypatch.setenv("MVLP_JAX_CPU_BLAS", "on")
    assert backend.select(jax.devices()).mkl
    monkeypatch.setenv("MVLP_JAX_CPU_BLAS", "off")
    assert not backend.select(jax.devices()[:1]).mkl
    monkeypatch.setenv("MVLP_JAX_CPU_BLAS", "yes")
    with pytest.raises(ValueError, match="MVLP_JAX_CPU_BLAS"):
        backend.select(jax.devices())


def test_sharding_active_enters_the_backend_of_the_mesh():
    from mvlp_jax.runtime import sharding

    seen = {}
    for n in (1, 8):
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",))
        with sharding.active(mesh):
            seen[n] = backend.current()
    assert seen[1].devices == 1 and seen[8] == backend.Backend("cpu", 8) and backend.current() is backend.PORTABLE


def test_without_mkl_it_falls_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("MVLP_JAX_CPU_BLAS", "on")
    monkeypatch.setattr(cpu_blas, "mkl_candidates", lambda: [])
    cpu_blas.load.cache_clear()
    backend._select.cache_clear()
    try:
        assert backend.select(jax.devices()[:1]) == backend.Backend("cpu", 1)
        assert "no MKL found: pip install 'mvlp_jax[cpu]'" in caplog.text
    finally:
        cpu_blas.load.cache_clear()
        backend._select.cache_clear()


def test_kernels_were_built_at_install_and_take_mkl_from_the_mkl_package():
    """No compiler call at run time and nothing from torch: the library setup.py built, MKL from `mvlp_jax[cpu]`."""
    library = cpu_blas.kernel_library()
    assert library is not None and library.parent == cpu_blas.SOURCE.parent and library.stat().st_size > 0
    assert all(p.name.startswith("libmkl_rt.so") for p in cpu_blas.mkl_candidates())
    assert not any("torch" in str(p) for p in cpu_blas.mkl_candidates())


def test_without_the_built_kernels_it_falls_back_naming_the_fix(monkeypatch, caplog):
    monkeypatch.setenv("MVLP_JAX_CPU_BLAS", "on")
    monkeypatch.setattr(cpu_blas, "kernel_library", lambda: None)
    cpu_blas.load.cache_clear()
    backend._select.cache_clear()
    try:
        assert backend.select(jax.devices()[:1]) == backend.Backend("cpu", 1)
        assert "was not built at install time" in caplog.text
    finally:
        cpu_blas.load.cache_clear()
        backend._select.cache_clear()


@pytest.mark.parametrize("mkl", [True, False])
def test_patch_conv_is_nn_conv(mkl):
    """Same parameters (so checkpoints load) and outputs as the strided nn.Conv it replaces, on either path."""
    from flax import linen as nn

    from mvlp_jax.models.vit import PatchConv

    images = jax.random.normal(jax.random.key(0), (2, 24, 16, 3))
    conv = nn.Conv(8, (4, 4), strides=(4, 4), padding="VALID")
    params = conv.init(jax.random.key(1), images)
    ours = PatchConv(8, 4)
    jax.tree.map(np.testing.assert_array_equal, nn.unbox(ours.init(jax.random.key(1), images)), params)
    with backend.use(_mkl_backend("mkl") if mkl else backend.PORTABLE):
        compiled = jax.jit(ours.apply).lower(params, images).compile()
    assert ("mvlp_gemm" in compiled.as_text()) == mkl
    np.testing.assert_allclose(compiled(params, images), conv.apply(params, images), rtol=1e-5, atol=1e-5)


def test_cross_attention_on_mkl_equals_xla_and_sows_the_same_weights():
    """Queries and keys of different lengths (a pooling probe's case), outputs and sown attention maps."""
    from mvlp_jax.models.transformer import Attention

    queries, keys = jax.random.normal(jax.random.key(0), (2, 3, 16)), jax.random.normal(jax.random.key(1), (2, 7, 16))
    attention = Attention(num_heads=4, sow_weights=True)
    params = attention.init(jax.random.key(2), queries, keys)
    results = {}
    for setting, chosen in (("on", _mkl_backend("mkl")), ("off", backend.PORTABLE)):
        with backend.use(chosen):
            apply = jax.jit(lambda p, q, k: attention.apply(p, q, k, mutable=["intermediates"]))
            apply = apply.lower(params, queries, keys).compile()
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
        assert gemm_choice.gemm_backend() == "mkl"
        monkeypatch.setenv("MVLP_JAX_CPU_GEMM", "xla")  # the override wins over the stored choice
        assert gemm_choice.gemm_backend() == "xla"
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
