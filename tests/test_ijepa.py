"""I-JEPA: the block sampler's statistics, a context encoder that sees nothing outside the context, targets and
loss against NumPy, the EMA target encoder without gradients, and training on the shipped sample that lowers the
loss without collapsing the targets."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvlp_jax import configuration
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.objectives import combine, ijepa
from mvlp_jax.pretrain import optim, train
from mvlp_jax.pretrain import train_step as ts
from mvlp_jax.runtime import sharding
from tests.pretrain_setup import build_sample, micro_config


def _config(encoder="vit", one_device=True, **overrides):
    """A micro encoder at 64 px with 8 px patches: an 8 x 8 grid, room for four target blocks and a context."""
    c = micro_config("", "", objectives={"ijepa": 1.0}, **overrides)
    c.model.image_size, c.model.encoder, c.model.window_size, c.model.dtype = 64, encoder, 4, "float32"
    c.ijepa.predictor_width, c.ijepa.predictor_depth, c.ijepa.predictor_heads = 32, 1, 2
    if one_device:
        c.mesh.data = 1
    configuration.validate(c)
    return c


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    b, grid = config.data.batch_size, ijepa.grid_of(config)
    masks = [ijepa.sample_masks(grid, config, rng) for _ in range(b)]
    return {
        "image": rng.normal(size=(b, 64, 64, 1)).astype(np.float32),
        "ijepa_context": np.stack([m[0] for m in masks]).astype(np.int32),
        "ijepa_targets": np.stack([m[1] for m in masks]).astype(np.int32),
    }


def test_blocks_follow_the_papers_scales_and_the_context_avoids_the_targets():
    config = micro_config("", "", objectives={"ijepa": 1.0})
    config.model.image_size = 224  # mu/8 at 224: a 28 x 28 grid
    grid, rng = ijepa.grid_of(config), np.random.default_rng(0)
    n = grid[0] * grid[1]
    areas, ratios = [], []
    for _ in range(400):
        block = ijepa.sample_block(grid, (0.15, 0.2), (0.75, 1.5), rng)
        rows, cols = np.flatnonzero(block.any(1)), np.flatnonzero(block.any(0))
        areas.append(block.sum() / n)
        ratios.append(len(rows) / len(cols))
        assert block.sum() == len(rows) * len(cols)  # one rectangle
    assert 0.13 <= min(areas) and max(areas) <= 0.22 and abs(np.mean(areas) - 0.175) < 0.01  # rounding to patches
    assert 0.7 <= min(ratios) and max(ratios) <= 1.6 and np.mean(np.array(ratios) > 1) > 0.5
    k_context, k_target = ijepa.token_counts(config)
    assert (k_context, k_target) == (round(0.25 * n), round(0.1 * n))
    for _ in range(50):
        context, targets = ijepa.sample_masks(grid, config, rng)
        assert context.shape == (k_context,) and targets.shape == (4, k_target)
        assert len(set(context)) == k_context and all(len(set(t)) == k_target for t in targets)
        assert not set(context) & set(targets.ravel())  # the context never holds a target patch
    config.ijepa.context_tokens = 0.9
    with pytest.raises(ValueError, match="ijepa.context_tokens=0.9"):
        ijepa.check(config)


@pytest.mark.parametrize("encoder", ["vit", "vitdet"])
def test_the_context_encoder_sees_nothing_outside_the_context(encoder):
    config = _config(encoder)
    model = Pretrainer(config, 0)
    batch = _batch(config)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(batch["image"]), method=Pretrainer.init_all)["params"]
    context = lambda images: model.apply(
        {"params": params}, jnp.asarray(images), jnp.asarray(batch["ijepa_context"]), method=ijepa.context_tokens
    )
    changed = batch["image"].copy()
    grid, p = ijepa.grid_of(config)[1], 8
    for i, ids in enumerate(batch["ijepa_context"]):
        outside = np.setdiff1d(np.arange(grid * grid), ids)
        for j in outside:  # new pixels in every patch that is not context
            r, c = divmod(int(j), grid)
            changed[i, r * p : (r + 1) * p, c * p : (c + 1) * p] += 3.0
    np.testing.assert_allclose(context(changed), context(batch["image"]), rtol=1e-5, atol=1e-5)
    assert (
        float(
            jnp.abs(
                model.apply({"params": params}, jnp.asarray(changed), method=ijepa.patch_tokens)
                - model.apply({"params": params}, jnp.asarray(batch["image"]), method=ijepa.patch_tokens)
            ).max()
        )
        > 1e-3
    )


def test_targets_and_loss_match_numpy_and_no_gradient_reaches_the_target_encoder():
    config = _config()
    model = Pretrainer(config, 0)
    state, _ = ts.create_state(model, optim.make(config), config, sharding.make_mesh(config, jax.devices()[:1]))
    batch = _batch(config)
    tokens = np.asarray(model.apply({"params": state.params}, jnp.asarray(batch["image"]), method=ijepa.patch_tokens))
    normed = (tokens - tokens.mean(-1, keepdims=True)) / np.sqrt(tokens.var(-1, keepdims=True) + 1e-6)
    ids = batch["ijepa_targets"]
    want = np.stack([normed[i][ids[i]] for i in range(len(ids))])  # (B, M, Kt, D)
    np.testing.assert_allclose(ijepa.targets(jnp.asarray(tokens), jnp.asarray(ids)), want, rtol=1e-5, atol=1e-5)
    predicted = np.asarray(
        model.apply(
            {"params": state.params},
            *(jnp.asarray(batch[k]) for k in ("image", "ijepa_context", "ijepa_targets")),
            train=False,
            method=ijepa.predict,
        )
    )
    loss_fn = combine.make(model, config)
    loss, metrics = loss_fn(state.params, batch, jax.random.PRNGKey(0), 0, state.extra)
    np.testing.assert_allclose(float(loss), np.mean((predicted - want) ** 2), rtol=1e-4)  # no dropout: deterministic
    np.testing.assert_allclose(metrics["ijepa/target_std"], want.reshape(-1, want.shape[-1]).std(0).mean(), rtol=1e-4)
    grads = jax.grad(
        lambda t: loss_fn(state.params, batch, jax.random.PRNGKey(0), 0, {**state.extra, ijepa.TARGET: t})[0]
    )(state.extra[ijepa.TARGET])
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))


def test_the_target_encoder_is_an_ema_of_the_encoder():
    config = _config(**{"ijepa.momentum": 0.9, "total_steps": 10})
    np.testing.assert_allclose([ijepa.momentum(config, s) for s in (0, 5, 10, 20)], [0.9, 0.95, 1.0, 1.0], rtol=1e-6)
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    model, tx = Pretrainer(config, 0), optim.make(config)
    state, state_sh = ts.create_state(model, tx, config, mesh)
    jax.tree.map(np.testing.assert_array_equal, state.extra[ijepa.TARGET], state.params["encoder"])
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _batch(config).items()}
    step = ts.compile_train_step(ts.make_train_step(model, tx, config), state, state_sh, mesh, shapes)
    expected = jax.device_get(state.extra[ijepa.TARGET])
    for k in range(3):
        state, _ = step(state, sharding.global_batch(_batch(config, k), mesh))
        m = float(ijepa.momentum(config, k))
        expected = jax.tree.map(
            lambda t, s, m=m: m * t + (1 - m) * s, expected, jax.device_get(state.params["encoder"])
        )
    for got, want in zip(jax.tree.leaves(state.extra[ijepa.TARGET]), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (
        max(
            float(np.abs(a - b).max())
            for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(jax.device_get(state.params["encoder"])))
        )
        > 0
    )


@pytest.mark.parametrize("encoder", ["vit", "vitdet"])
def test_training_on_the_sample_lowers_the_loss_without_collapse(tmp_path, encoder):
    data_dir = build_sample(str(tmp_path), image_size=64)
    config = _config(  # on the 8-device mesh; one checkpoint, at the end
        encoder, one_device=False, total_steps=20, **{"optim.warmup_steps": 4, "checkpoint.save_interval_steps": 20}
    )
    config.data.data_dir = data_dir
    config.objectives = {"ijepa": 1.0, "mae": 1.0}  # beside another objective, in turn
    config.task_schedule = "cyclic"
    train.train(config, str(tmp_path / "run"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    rows = [r for r in rows if "ijepa/loss" in r]  # its steps of the cycle
    losses = [r["ijepa/loss"] for r in rows]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert min(r["ijepa/target_std"] for r in rows) > 0.3, [r["ijepa/target_std"] for r in rows]  # no collapse


def test_the_picture_shows_the_context_and_the_target_blocks():
    import flax.linen as nn

    from mvlp_jax.pretrain.visualize import Painter, Shown

    config = _config()
    pixels = np.random.default_rng(0).integers(0, 256, (3, 64, 64)).astype(np.uint8)
    images = ((pixels / 255.0 - config.data.mean) / config.data.std)[..., None].astype(np.float32)
    model, key = Pretrainer(config, 0), jax.random.PRNGKey(0)
    params = nn.unbox(model.init({"params": key, "masking": key}, images, method=Pretrainer.init_all)["params"])
    pictures = Painter(config, 0).draw(params, Shown(images, pixels, ["a", "b", "c"]))
    assert "ijepa_blocks" in pictures and pictures["ijepa_blocks"].dtype == np.uint8
