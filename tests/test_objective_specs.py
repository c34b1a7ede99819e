"""Objectives describe themselves: a new one defined here trains without editing a project file, the input
pipeline builds only the views of the step's objective, a cyclic step's FLOPs count one objective, and the
checkpointed state is laid out as before the specs (old checkpoints restore)."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvlp_jax import configuration
from mvlp_jax.data import pipeline, transforms, views
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.objectives import registry
from mvlp_jax.objectives.spec import Spec
from mvlp_jax.pretrain import optim, train
from mvlp_jax.pretrain import train_step as ts
from mvlp_jax.runtime import sharding
from tests.pretrain_setup import micro_config
from tests.test_multitask import _micro

# --- a toy I-JEPA-like latent prediction, defined only here --------------------------------------------------


def _target_crop(inputs: views.ViewInputs) -> dict[str, np.ndarray]:
    """A second, independent crop of the same image: the latent target."""
    s = inputs.config.model.image_size
    box = transforms.random_resized_crop_box(*inputs.decoded.shape, (0.3, 0.6), inputs.rng)
    return {"target_view": inputs.normalise(transforms.crop_resize(inputs.decoded, box, s))}


def _predict(model: nn.Module, images: jax.Array, target_views: jax.Array, train: bool = True):
    context = model.features(images, "mean", train)
    target = jax.lax.stop_gradient(model.features(target_views, "mean", False))
    return model.latent_predictor(context), target


def _make_loss(model, config):
    def objective(params, batch, rng, context):
        predicted, target = model.apply(
            {"params": params}, batch["image"], batch["target_view"], rngs={"dropout": rng}, method=_predict
        )
        loss = jnp.mean((predicted - target) ** 2)
        return loss, {"loss": loss}

    return objective


TOY = Spec(
    name="toy_latent",
    make_loss=_make_loss,
    entries=lambda c: {"target_view": ((c.model.image_size, c.model.image_size, 1), np.float32)},
    views=_target_crop,
    heads=lambda model, config, dtype: {"latent_predictor": nn.Dense(64, name="latent_predictor")},
    init=lambda model, images, targets: _predict(model, images, images, train=False),
)


@pytest.fixture
def toy_objective():
    registry.register(TOY)
    yield TOY
    del registry.SPECS[TOY.name]


def test_an_objective_defined_in_a_test_trains_on_the_shipped_sample(toy_objective, pretrain_data, tmp_path):
    data_dir, emb, _ = pretrain_data
    config = micro_config(data_dir, emb, objectives={"toy_latent": 1.0, "mae": 1.0}, total_steps=4)
    configuration.validate(config)
    outcome = train.train(config, str(tmp_path))
    assert int(outcome.state.step) == 4
    assert outcome.state.params["latent_predictor"]["kernel"].shape == (64, 64)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["toy_latent/loss"] for r in rows]
    assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] != losses[0]
    assert "target" not in ts.example_batch(config, 24)  # it reads no LLM target, so none is joined


def test_an_unregistered_objective_is_refused_by_name():
    config = _micro()
    config.objectives = {"toy_latent": 1.0}
    with pytest.raises(
        ValueError,
        match="'objectives' .* must map registered objective names .*registered: "
        "llm_contrastive, mae, mflag, dino, query_box, ijepa, local_alignment",
    ):
        configuration.validate(config)


# --- the pipeline builds the views of the step's objective only ----------------------------------------------


def _tiny_source(n: int = 4) -> list[dict]:
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8)).save(buffer, format="PNG")
        out.append({"image": buffer.getvalue(), "study_id": f"s{i}".encode()})
    return out


def _views_per_step(config, monkeypatch, steps: int) -> tuple[list[float], list[set]]:
    """Per global step of the training pipeline (`local_batches`, one process): resized views made per example
    (crop_resize calls: the training crop, each DINO crop, the query region) and the batch entries that are not
    all zeros."""
    calls = []
    real = transforms.crop_resize
    monkeypatch.setattr(transforms, "crop_resize", lambda *a, **k: calls.append(1) or real(*a, **k))
    source = _tiny_source(5)  # fewer records than a batch: positions and record numbers differ
    records = pipeline.TrainRecords(source, np.arange(len(source)), None, None, "tiny")
    batches = pipeline.local_batches(records, config, 0, 1)
    made, filled = [], []
    for step in range(steps):
        before = len(calls)
        batch = batches[step]
        assert set(batch) == {"image", "global_views", "local_views", "query", "box"}
        made.append((len(calls) - before) / config.data.batch_size)
        filled.append({k for k, v in batch.items() if np.any(v)})
    return made, filled


def test_a_cyclic_step_builds_only_its_objectives_views(monkeypatch):
    locals_ = 2
    summed, summed_keys = _views_per_step(
        _micro(task_schedule="sum", **{"dino.num_local_crops": locals_}), monkeypatch, 6
    )
    cyclic, cyclic_keys = _views_per_step(
        _micro(task_schedule="cyclic", **{"dino.num_local_crops": locals_}), monkeypatch, 6
    )
    every = 1 + (2 + locals_) + 1  # training crop, DINO's 2 global + local crops, the query region
    assert summed == [every] * 6
    assert summed_keys == [{"image", "global_views", "local_views", "query", "box"}] * 6
    # name order: dino (its crops only), mae (the training crop), query_box (the training crop and its region)
    assert cyclic == [2 + locals_, 1, 2] * 2
    assert cyclic_keys == [{"global_views", "local_views"}, {"image"}, {"image", "query", "box"}] * 2


# --- MFU of a cyclic step ------------------------------------------------------------------------------------


def test_a_cyclic_steps_flops_are_one_objectives_not_every_branchs():
    config = _micro(task_schedule="cyclic", objectives={"mae": 1.0, "query_box": 1.0})  # two, to compile fewer
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    model, tx = Pretrainer(config, 0), optim.make(config)
    state, state_sh = ts.create_state(model, tx, config, mesh)
    shapes = jax.eval_shape(lambda: ts.example_batch(config, 0, config.data.batch_size))

    def compiled_flops(only=None):
        step = ts.compile_train_step(ts.make_train_step(model, tx, config, only), state, state_sh, mesh, shapes)
        return float(step.cost_analysis()["flops"])

    counted = compiled_flops()
    alone = {name: compiled_flops([name]) for name in sorted(config.objectives)}
    share = ts.cyclic_flops_share(model, tx, config, state, state_sh, mesh, shapes)
    # XLA counts the costliest branch for every step: the overstatement being corrected
    np.testing.assert_allclose(counted, max(alone.values()), rtol=0.05)
    assert alone["query_box"] > 1.2 * alone["mae"]
    np.testing.assert_allclose(counted * share, np.mean(list(alone.values())), rtol=0.05)
    assert ts.cyclic_flops_share(model, tx, _micro(task_schedule="sum"), state, state_sh, mesh, shapes) == 1.0


# --- checkpoints written before the objectives described themselves still restore ---------------------------

# sha256 (first 16 hex digits) of every checkpointed array's path, shape and dtype in the train state of each
# demo config, as the code of commit 4087cb2 (objectives wired in by name) laid it out (target width 24)
LAYOUT_BEFORE_SPECS = {
    "configs/pretrain.py:demo": ("f97bf1e08762c18c", 783),
    "configs/mae.py:demo": ("b91cb409afb64ac9", 714),
    "configs/mflag.py:demo": ("4bba8b5c8eb4f0f0", 633),
    "configs/multitask.py:demo": ("672a74fe32626673", 848),
    "configs/pretrain.py:demo,vitdet": ("92213f76f31616c2", 672),
}


@pytest.mark.parametrize("name", sorted(LAYOUT_BEFORE_SPECS))
def test_the_checkpointed_state_is_laid_out_as_before(name):
    import hashlib

    from mvlp_jax.tools.demo import load_config

    file, variant = name.split(":")
    config = load_config(os.path.splitext(os.path.basename(file))[0], variant)
    target_dim = 24 if registry.needs_targets(config) else 0
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    _, abstract, _ = ts.state_layout(Pretrainer(config, target_dim), optim.make(config), config, mesh)
    layout = {
        jax.tree_util.keystr(p): [list(x.shape), str(x.dtype)]
        for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }
    digest = hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:16]
    assert (digest, len(layout)) == LAYOUT_BEFORE_SPECS[name]
