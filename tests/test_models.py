"""Encoders and heads: window attention, ViTDet vs ViT, scan/remat equivalence, shapes, dtypes, jit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvlp_jax.models import heads
from mvlp_jax.models.transformer import Attention, Block, count_params, gelu
from mvlp_jax.models.vit import MAE, VARIANTS, ViT, patchify, unpatchify, variant
from mvlp_jax.models.vitdet import SimMIM, ViTDet, window_partition, window_unpartition

TINY = dict(width=32, depth=4, num_heads=4, mlp_dim=64, patch_size=4)


def _images(shape=(2, 32, 32, 1), seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("grid", [(8, 8), (7, 10)])
def test_window_attention_equals_global_attention_with_block_diagonal_mask(grid):
    window, width = 4, 16
    tokens = jax.random.normal(jax.random.key(1), (2, grid[0] * grid[1], width))
    block = Block(num_heads=2, mlp_dim=32)
    params = block.init(jax.random.key(0), tokens)
    windows, key_mask = window_partition(tokens, grid, window)
    windowed = window_unpartition(block.apply(params, windows, 0.0, key_mask)[0], 2, grid, window)
    rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    window_id = (rows // window) * 100 + cols // window
    block_diagonal = jnp.asarray(window_id[:, None] == window_id[None, :])[None, None]
    reference = block.apply(params, tokens, 0.0, block_diagonal)[0]
    np.testing.assert_allclose(np.asarray(windowed), np.asarray(reference), atol=1e-5)


def test_window_partition_round_trips_with_padding():
    x = jax.random.normal(jax.random.key(2), (3, 5 * 7, 8))
    windows, mask = window_partition(x, (5, 7), 3)
    assert windows.shape == (3 * 2 * 3, 9, 8) and int(mask.sum()) == 3 * 5 * 7
    np.testing.assert_array_equal(np.asarray(window_unpartition(windows, 3, (5, 7), 3)), np.asarray(x))


def test_vitdet_with_every_block_global_equals_plain_vit():
    images = _images()
    vit = ViT(**TINY, cls_token=False)
    params = vit.init(jax.random.key(0), images)
    det = ViTDet(**TINY, window_size=3, global_blocks=tuple(range(TINY["depth"])))
    np.testing.assert_allclose(np.asarray(det.apply(params, images)), np.asarray(vit.apply(params, images)), atol=1e-6)
    windowed = ViTDet(**TINY, window_size=3)  # same params, windows on: a different function
    assert not np.allclose(np.asarray(windowed.apply(params, images)), np.asarray(vit.apply(params, images)))


def test_scan_and_remat_equal_the_plain_loop():
    images = _images()
    loop = ViT(**TINY)
    params = nn.unbox(loop.init(jax.random.key(0), images)["params"])
    scanned_params = _stacked(params, TINY["depth"])
    expected = loop.apply({"params": params}, images)
    for model, p in [
        (ViT(**TINY, scan=True), scanned_params),
        (ViT(**TINY, remat_policy="full"), params),
        (ViT(**TINY, scan=True, remat_policy="dots"), scanned_params),
    ]:
        np.testing.assert_allclose(np.asarray(model.apply({"params": p}, images)), np.asarray(expected), atol=1e-5)
    grad = lambda m, p: jax.grad(lambda q: jnp.sum(m.apply({"params": q}, images) ** 2))(p)
    g_loop, g_remat = grad(loop, params), grad(ViT(**TINY, remat_policy="full"), params)
    for a, b in zip(jax.tree.leaves(g_loop), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _stacked(params: dict, depth: int) -> dict:
    """Looped encoder params (block_00, block_01, ...) in the scanned layout (blocks stacked on axis 0)."""
    blocks = [params["encoder"][f"block_{i:02d}"] for i in range(depth)]
    return {
        **params,
        "encoder": {"norm": params["encoder"]["norm"], "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)},
    }


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_vitdet_scanned_equals_its_loop_with_windows_and_global_blocks(remat):
    images = _images((2, 28, 40, 1))  # a 7 x 10 grid: windows of 3 are padded
    kwargs = dict(**TINY, window_size=3, global_blocks=(1, 3), drop_path=0.2, remat_policy=remat)
    loop = ViTDet(**kwargs)
    params = nn.unbox(loop.init(jax.random.key(0), images)["params"])
    scanned = ViTDet(**kwargs, scan=True)
    stacked = _stacked(params, TINY["depth"])
    assert jax.tree.map(jnp.shape, nn.unbox(scanned.init(jax.random.key(0), images)["params"])) == jax.tree.map(
        jnp.shape, stacked
    )
    out = lambda m, p, train=False: m.apply({"params": p}, images, train=train, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_allclose(np.asarray(out(scanned, stacked)), np.asarray(out(loop, params)), atol=1e-5)
    loss = lambda m: lambda p: jnp.sum(out(m, p) ** 2)
    g_loop, g_scan = jax.grad(loss(loop))(params), jax.grad(loss(scanned))(stacked)
    g_loop = _stacked(g_loop, TINY["depth"])
    for a, b in zip(jax.tree.leaves(g_loop), jax.tree.leaves(g_scan)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    all_global = ViTDet(**{**kwargs, "global_blocks": tuple(range(TINY["depth"]))}, scan=True)
    assert not np.allclose(np.asarray(out(all_global, stacked)), np.asarray(out(scanned, stacked)))


@pytest.mark.parametrize("name", [f"{v}/16" for v in VARIANTS] + ["H/14"])
def test_variant_shapes(name):
    cfg = variant(name)
    size = 224
    out = jax.eval_shape(lambda: ViT(**cfg).init_with_output(jax.random.key(0), jnp.zeros((2, size, size, 1)))[0])
    assert out.shape == (2, 1 + (size // cfg["patch_size"]) ** 2, cfg["width"]) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="unknown ViT variant"):
        variant("X/16")


def test_bfloat16_compute_is_finite_with_float32_params():
    images = _images((2, 32, 48, 3))
    model = ViT(**TINY, dtype=jnp.bfloat16, drop_path=0.1, dropout=0.1)
    variables = model.init(jax.random.key(0), images)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))
    out = model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(1)})
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 1 + 8 * 12, 32) and bool(jnp.isfinite(out).all())
    det = ViTDet(**TINY, window_size=5, dtype=jnp.bfloat16)
    out = det.apply(det.init(jax.random.key(0), images), images)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out).all())


def test_jit_compiles_once_per_shape():
    traces = []
    model = MAE(ViT(**TINY), decoder_width=16, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32)
    images = _images()
    variables = model.init({"params": jax.random.key(0), "masking": jax.random.key(1)}, images)

    @jax.jit
    def loss(variables, images, rng):
        traces.append(1)
        return model.apply(variables, images, rngs={"masking": rng})["loss"]

    for step in range(3):
        assert np.isfinite(float(loss(variables, images + step, jax.random.key(step))))
    assert len(traces) == 1


def test_mae_masks_the_configured_fraction_and_reconstructs_shapes():
    model = MAE(ViT(**TINY), decoder_width=16, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32, mask_ratio=0.75)
    images = _images((3, 32, 48, 1))
    out, _ = model.init_with_output({"params": jax.random.key(0), "masking": jax.random.key(1)}, images)
    assert out["mask"].shape == (3, 96) and np.all(np.asarray(out["mask"]).sum(1) == 72)
    assert out["latent"].shape == (3, 1 + 24, 32) and out["pred"].shape == (3, 96, 16)
    np.testing.assert_array_equal(np.asarray(unpatchify(patchify(images, 4), (8, 12), 4, 1)), np.asarray(images))


def test_learned_position_embeddings_interpolate_to_new_sizes():
    model = ViT(**TINY, posemb="learned", image_size=32)
    params = model.init(jax.random.key(0), _images())
    assert model.apply(params, _images((1, 48, 64, 1))).shape == (1, 1 + 12 * 16, 32)


def test_simmim_loss_depends_only_on_masked_patches():
    model = SimMIM(ViTDet(**TINY, window_size=4), mask_ratio=0.5)
    images = _images()
    noise = jax.random.uniform(jax.random.key(3), (2, 64))
    variables = model.init({"params": jax.random.key(0)}, images, noise=noise)
    out = model.apply(variables, images, noise=noise)
    grads = jax.grad(lambda p: model.apply({"params": p}, images, noise=noise)["loss"])(nn.unbox(variables["params"]))
    assert float(jnp.abs(grads["encoder"]["mask_token"]).sum()) > 0
    # The loss reads predictions of masked patches only: perturbing predictions elsewhere changes nothing.
    from mvlp_jax.models.vit import reconstruction_loss

    target = patchify(images, 4)
    shifted = out["pred"] + (1 - out["mask"])[..., None] * 10.0
    np.testing.assert_allclose(
        float(reconstruction_loss(shifted, target, out["mask"], False)), float(out["loss"]), rtol=1e-6
    )


def test_heads_shapes_and_properties():
    tokens = jax.random.normal(jax.random.key(0), (3, 17, 32))
    for kind in heads.POOLINGS:
        pool = heads.Pool(kind, has_cls=True, num_heads=4)
        assert pool.apply(pool.init(jax.random.key(0), tokens), tokens).shape == (3, 32)
    with pytest.raises(ValueError, match="CLS"):
        heads.Pool("cls", has_cls=False).init(jax.random.key(0), tokens)
    for proj in (
        heads.ProjectionHead(8),
        heads.ProjectionHead(8, "mlp", 16, norm="batch"),
        heads.ProjectionHead(8, "mlp", 16, norm="batch", out_norm=True),
    ):
        out = proj.apply(proj.init(jax.random.key(0), tokens[:, 0]), tokens[:, 0])
        assert out.shape == (3, 8) and "batch_stats" not in proj.init(jax.random.key(0), tokens[:, 0])
        if proj.out_norm:  # affine-free batch norm at the output: zero mean, unit variance over the batch
            np.testing.assert_allclose(out.mean(0), 0, atol=1e-5)
            np.testing.assert_allclose(out.var(0), 1, rtol=1e-3)
    dino = heads.DINOHead(out_dim=64, hidden_dim=32, bottleneck_dim=16)
    params = dino.init(jax.random.key(0), tokens[:, 0])
    logits = dino.apply(params, tokens[:, 0])
    assert logits.shape == (3, 64) and float(jnp.abs(logits).max()) <= 1.0 + 1e-5  # unit vectors x unit columns
    box = heads.BoxHead(16)
    b = box.apply(box.init(jax.random.key(0), tokens[:, 0]), tokens[:, 0])
    assert b.shape == (3, 4) and bool(((b > 0) & (b < 1)).all())


def test_last_block_attention_maps():
    images = _images()
    for model in (ViT(**TINY, sow_attention=True), ViT(**TINY, sow_attention=True, scan=True)):
        params = model.init(jax.random.key(0), images)["params"]
        weights = heads.last_block_attention(model, params, images)
        assert weights.shape == (2, 4, 65, 65)
        np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="sow_attention"):
        heads.last_block_attention(ViT(**TINY), ViT(**TINY).init(jax.random.key(0), images)["params"], images)
    assert count_params(params) > 0


def test_attention_projections_initialise_as_dense_general():
    """The heads-major projections keep nn.DenseGeneral's parameters and its draw (xavier on the flattened
    matrix): same shapes, same values for the same key, so checkpoints and init scales are unchanged."""

    class Reference(nn.Module):
        @nn.compact
        def __call__(self, x):
            xavier = nn.initializers.xavier_uniform()
            for name in ("query", "key", "value"):
                nn.DenseGeneral((4, 8), kernel_init=xavier, name=name)(x)
            return nn.DenseGeneral(32, axis=(-2, -1), kernel_init=xavier, name="out")(x.reshape(1, 3, 4, 8))

    x = jnp.ones((1, 3, 32))
    got = nn.unbox(Attention(num_heads=4).init(jax.random.key(3), x)["params"])
    want = Reference().init(jax.random.key(3), x)["params"]
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g, w)


def test_gelu_is_the_exact_gelu():
    x = jnp.linspace(-8.0, 8.0, 1001)
    np.testing.assert_allclose(np.asarray(gelu(x)), np.asarray(jax.nn.gelu(x, approximate=False)), atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(jax.grad(lambda x: gelu(x).sum())(x)),
        np.asarray(jax.grad(lambda x: jax.nn.gelu(x, approximate=False).sum())(x)),
        atol=1e-6,
    )
