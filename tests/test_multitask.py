"""The toolkit's objectives: DINO (loss, schedules, EMA teacher without gradients, center) and query-box
localization (targets from known crops, GIoU by hand), and the cyclic multitask config on a mesh."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import multitask as multitask_config
from mvlp_jax import configuration
from mvlp_jax.data import transforms, views
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.objectives import combine, dino, query_box
from mvlp_jax.pretrain import encoder as encoder_lib
from mvlp_jax.pretrain import optim
from mvlp_jax.pretrain import train_step as ts
from mvlp_jax.runtime import checkpointing, observe, sharding


def _micro(**overrides):
    """configs/multitask.py:demo shrunk: micro ViTDet at 32 px, 16 px local crops and queries, batch 8."""
    c = multitask_config.get_config("demo")
    c.model.variant, c.model.image_size, c.model.window_size, c.model.decoder_width = "mu/8", 32, 2, 32
    c.model.dtype = "float32"
    c.dino.local_size, c.dino.out_dim, c.dino.hidden_dim, c.query_box.size = 16, 64, 32, 16
    c.data.batch_size, c.total_steps, c.mesh.data = 8, 20, 1
    for key, value in overrides.items():
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    configuration.validate(c)
    return c


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    batch = {
        k: rng.normal(size=v.shape).astype(np.float32)
        for k, v in ts.example_batch(config, 0, config.data.batch_size).items()
    }
    if "box" in batch:
        batch["box"] = rng.uniform(0.2, 0.6, size=batch["box"].shape).astype(np.float32)
    return batch


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_dino_loss_and_schedules_match_a_direct_computation():
    rng = np.random.default_rng(0)
    student, teacher, center = rng.normal(size=(4, 5, 7)), rng.normal(size=(2, 5, 7)), rng.normal(size=7)
    targets = _np_softmax((teacher - center) / 0.04)
    log_probs = np.log(_np_softmax(student / 0.1))
    pairs = [(t, v) for t in range(2) for v in range(4) if v != t]
    want = np.mean([np.mean(-np.sum(targets[t] * log_probs[v], -1)) for t, v in pairs])
    np.testing.assert_allclose(dino.loss(student, teacher, center, 0.1, 0.04), want, rtol=1e-5)
    c = _micro(
        **{
            "dino.warmup_teacher_temp": 0.02,
            "dino.teacher_temp": 0.06,
            "dino.teacher_temp_warmup_steps": 10,
            "dino.momentum": 0.99,
            "total_steps": 20,
        }
    )
    assert [round(float(dino.teacher_temperature(c, s)), 6) for s in (0, 5, 10, 15)] == [0.02, 0.04, 0.06, 0.06]
    np.testing.assert_allclose(
        [dino.teacher_momentum(c, s) for s in (0, 10, 20, 30)], [0.99, 0.995, 1.0, 1.0], atol=1e-7
    )


def test_teacher_is_an_ema_of_the_student_with_no_gradient_and_the_center_moves(tmp_path):
    config = _micro(objectives={"dino": 1.0}, **{"dino.momentum": 0.9, "dino.center_momentum": 0.8})
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    model, tx = Pretrainer(config, 0), optim.make(config)
    state, state_sh = ts.create_state(model, tx, config, mesh)
    batch = _batch(config)
    loss_fn = combine.make(model, config)
    with_teacher = lambda t: {**state.extra, "teacher": t[0], "center": t[1]}
    grads = jax.grad(lambda t: loss_fn(state.params, batch, jax.random.PRNGKey(0), 0, with_teacher(t))[0])(
        (state.extra["teacher"], state.extra["center"])
    )
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))  # nothing flows into the teacher
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    step = ts.compile_train_step(ts.make_train_step(model, tx, config), state, state_sh, mesh, shapes)
    expected, center = jax.device_get(state.extra["teacher"]), None
    for k in range(3):
        views = _batch(config, k)["global_views"]
        teacher_out = model.apply(
            {"params": {**state.params, **state.extra["teacher"]}},
            views.reshape(-1, *views.shape[2:]),
            train=False,
            method=dino.embed,
        )
        # the first step's batch mean becomes the center, later ones move it with momentum 0.8
        mean = np.asarray(teacher_out).mean(0)
        center = mean if center is None else 0.8 * center + 0.2 * mean
        state, metrics = step(state, sharding.global_batch(_batch(config, k), mesh))
        np.testing.assert_allclose(state.extra["center"], center, rtol=1e-4, atol=1e-6)
        if k == 0:  # the collapse diagnostics: mean entropy of the targets, and entropy of their batch mean
            targets = _np_softmax((np.asarray(teacher_out) - mean) / float(dino.teacher_temperature(config, 0)))
            entropy = lambda p: -(p * np.log(p + 1e-12)).sum(-1)
            np.testing.assert_allclose(metrics["dino/teacher_entropy"], entropy(targets).mean(), rtol=1e-4)
            np.testing.assert_allclose(metrics["dino/batch_target_entropy"], entropy(targets.mean(0)), rtol=1e-4)
        m = float(dino.teacher_momentum(config, k))
        student = jax.device_get({n: state.params[n] for n in dino.TEACHER})
        expected = jax.tree.map(lambda t, s, m=m: m * t + (1 - m) * s, expected, student)
    assert int(state.extra["center_steps"]) == 3
    teacher = jax.tree_util.tree_leaves_with_path(state.extra["teacher"])
    for (path, got), want in zip(teacher, jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    moved = jax.tree.map(
        lambda t, s: float(np.abs(np.asarray(t) - np.asarray(s)).max()),
        state.extra["teacher"],
        {n: state.params[n] for n in dino.TEACHER},
    )
    assert max(jax.tree.leaves(moved)) > 0  # the teacher lags the student
    # the evaluation side restores either network from a checkpoint of this state
    workdir = str(tmp_path)
    configuration.save(config, workdir, 0)
    store = checkpointing.Store(workdir, config)
    store.save(3, state, {"next_step": 3}, force=True)
    store.seal()
    for teacher, want in ((False, state.params["encoder"]), (True, state.extra["teacher"]["encoder"])):
        got = encoder_lib.load(workdir, -1, mesh, teacher=teacher)
        assert got.name == os.path.basename(workdir) + ("/teacher" if teacher else "")
        jax.tree.map(np.testing.assert_array_equal, got.params["encoder"], jax.device_get(want))


def test_query_targets_are_the_boxes_of_the_crops():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size=(64, 64)).astype(np.uint8)
    for seed in range(5):
        query, box = views.query_region(image, 16, (0.05, 0.3), np.random.default_rng(seed))
        top, left, h, w = transforms.random_resized_crop_box(64, 64, (0.05, 0.3), np.random.default_rng(seed))
        np.testing.assert_allclose(box, [(left + w / 2) / 64, (top + h / 2) / 64, w / 64, h / 64], rtol=1e-6)
        x0, y0 = round((box[0] - box[2] / 2) * 64), round((box[1] - box[3] / 2) * 64)
        crop = transforms.crop_resize(image, (y0, x0, round(box[3] * 64), round(box[2] * 64)), 16)
        np.testing.assert_array_equal(query, crop)  # the box, read back, cuts out exactly the query


def test_iou_and_giou_match_a_direct_computation():
    # a: x 0..2, y 0..2; b: x 1..4, y 1..3 -> intersection 1, union 4 + 6 - 1 = 9, hull 4 x 3 = 12
    a, b = jnp.array([[1.0, 1.0, 2.0, 2.0]]), jnp.array([[2.5, 2.0, 3.0, 2.0]])
    iou, giou = query_box.iou_and_giou(a, b)
    np.testing.assert_allclose([float(iou[0]), float(giou[0])], [1 / 9, 1 / 9 - (12 - 9) / 12], rtol=1e-6)
    far = query_box.iou_and_giou(jnp.array([[0.1, 0.1, 0.1, 0.1]]), jnp.array([[0.9, 0.9, 0.1, 0.1]]))
    assert float(far[0][0]) == 0 and -1 < float(far[1][0]) < 0  # disjoint boxes still get a gradient signal
    same = query_box.iou_and_giou(b, b)
    np.testing.assert_allclose([float(same[0][0]), float(same[1][0])], [1.0, 1.0])


@pytest.mark.parametrize("schedule", ["cyclic"])
def test_multitask_on_a_mesh_equals_one_device(schedule):
    batches = [_batch(_micro(), seed) for seed in range(3)]
    runs = []
    for devices, mesh in ((jax.devices()[:1], (1, 1)), (jax.devices(), (2, 4))):
        config = _micro(task_schedule=schedule, **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1]})
        m = sharding.make_mesh(config, devices)
        model, tx = Pretrainer(config, 0), optim.make(config)
        state, state_sh = ts.create_state(model, tx, config, m)
        shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches[0].items()}
        step = ts.compile_train_step(ts.make_train_step(model, tx, config), state, state_sh, m, shapes)
        losses, interval = [], observe.IntervalMeans()
        for b in batches:
            state, metrics = step(state, sharding.global_batch(b, m))
            interval.add(metrics)
            losses.append({k: float(v) for k, v in metrics.items() if k.endswith("loss")})
        runs.append((losses, jax.device_get(state.extra["center"]), interval.means()))
    (ref, ref_center, ref_means), (got, got_center, _) = runs
    if schedule == "cyclic":  # one task per step, in name order; each logged mean over its own steps only
        for name in ("dino", "mae", "query_box"):
            np.testing.assert_allclose(ref_means[f"{name}/loss"], sum(s[f"{name}/loss"] for s in ref), rtol=1e-6)
        np.testing.assert_allclose(ref_means["loss"], np.mean([s["loss"] for s in ref]), rtol=1e-6)
        assert [[k for k, v in step.items() if v and k != "loss"] for step in ref] == [
            ["dino/loss"],
            ["mae/loss"],
            ["query_box/loss"],
        ]
    for r, g in zip(ref, got):
        for k in r:
            np.testing.assert_allclose(g[k], r[k], rtol=1e-4, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(got_center, ref_center, rtol=1e-4, atol=1e-6)
