"""Pictures of what a run learned: the reconstruction keeps the visible patches and undoes per-patch
normalisation, nearest reports rank by similarity, training writes the pictures (PNG and TensorBoard) and the
command draws them for a checkpoint."""

import glob
import os

import numpy as np
import pytest


def test_the_prediction_shows_visible_patches_of_the_input_and_masked_ones_of_the_model():
    import jax.numpy as jnp

    from mvlp_jax.models.vit import patchify
    from mvlp_jax.pretrain.visualize import paste

    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
    patches = np.asarray(patchify(jnp.asarray(images), 4))  # (2, 4, 16)
    mask = np.array([[1, 0, 0, 1], [0, 0, 0, 0]], bool)
    model = rng.normal(size=patches.shape).astype(np.float32)
    shown = paste(images, model, mask, 4, norm_pix=False)[..., 0]
    images = images[..., 0]
    np.testing.assert_array_equal(shown[1], images[1])  # nothing masked: the input itself
    np.testing.assert_array_equal(shown[0, :4, 4:], images[0, :4, 4:])  # patch 1 visible
    np.testing.assert_array_equal(shown[0, :4, :4].reshape(-1), model[0, 0])  # patch 0 from the model
    np.testing.assert_array_equal(shown[0, 4:, 4:].reshape(-1), model[0, 3])
    # a model that predicts the per-patch normalised target exactly draws the input back
    mean, var = patches.mean(-1, keepdims=True), patches.var(-1, keepdims=True, ddof=1)
    perfect = (patches - mean) / np.sqrt(var + 1e-6)
    np.testing.assert_allclose(
        paste(images[..., None], perfect, np.ones((2, 4), bool), 4, norm_pix=True)[..., 0], images, atol=1e-5
    )


def test_nearest_reports_rank_by_similarity_with_ties_counted_against_the_own_report():
    from mvlp_jax.pretrain.visualize import nearest

    similarity = np.array([[0.9, 0.1, 0.5, 0.5], [0.2, 0.3, 0.3, 0.1]])
    (best0, rank0), (best1, rank1) = nearest(similarity, np.array([2, 2]), k=2)
    assert best0.tolist() == [0, 2] and rank0 == 3  # 0.9 above, 0.5 tied with it
    assert best1.tolist() == [1, 2] and rank1 == 2


def _event_tags(workdir: str) -> set[str]:
    from tensorflow.core.util import event_pb2
    from tensorflow.python.lib.io import tf_record

    tags = set()
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        for raw in tf_record.tf_record_iterator(path):
            event = event_pb2.Event.FromString(raw)
            tags |= {value.tag for value in event.summary.value}
    return tags


def test_training_draws_pictures_and_the_command_draws_a_checkpoint(pretrain_data, tmp_path):
    from PIL import Image

    from mvlp_jax.pretrain import train
    from mvlp_jax.pretrain.visualize import draw_checkpoint
    from tests.pretrain_setup import micro_config

    data_dir, emb, _ = pretrain_data
    workdir = str(tmp_path / "run")
    train.train(micro_config(data_dir, emb, total_steps=3, log_images_every_steps=2), workdir)
    names = ("reconstruction", "attention", "nearest_reports")
    drawn = sorted(os.listdir(os.path.join(workdir, "plots")))
    assert drawn == sorted(f"{n}_{s}.png" for n in names for s in (2, 3)), drawn  # every 2 steps and at the end
    assert {f"images/{n}" for n in names} <= _event_tags(workdir)
    for name in names:
        with Image.open(os.path.join(workdir, "plots", f"{name}_3.png")) as picture:
            assert picture.mode == "RGB" and min(picture.size) > 200
    os.remove(os.path.join(workdir, "plots", "attention_3.png"))
    paths = draw_checkpoint(workdir, split="test", count=4)
    assert sorted(os.path.basename(p) for p in paths) == sorted(f"{n}_3.png" for n in names)
    with pytest.raises(ValueError, match="split 'holdout' is not in the dataset"):
        draw_checkpoint(workdir, split="holdout")


def test_a_vitdet_multitask_run_gets_query_boxes_and_token_similarity_but_no_reports(tmp_path):
    import flax.linen as nn
    import jax

    from mvlp_jax import configuration
    from mvlp_jax.models.pretrainer import Pretrainer
    from mvlp_jax.pretrain.visualize import Painter, Shown
    from tests.test_multitask import _micro

    config = _micro()
    configuration.validate(config)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32)).astype(np.uint8)
    images = ((pixels / 255.0 - config.data.mean) / config.data.std)[..., None].astype(np.float32)
    model = Pretrainer(config, 0)
    key = jax.random.PRNGKey(0)
    params = nn.unbox(
        model.init({"params": key, "masking": key, "dropout": key}, images, None, method=Pretrainer.init_all)["params"]
    )
    pictures = Painter(config, 0).draw(params, Shown(images, pixels, ["a", "b", "c"]))
    assert set(pictures) == {"reconstruction", "attention", "query_box"}
    assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[-1] == 3 for p in pictures.values())


def test_a_study_encoder_draws_each_image_with_its_view_type():
    import flax.linen as nn
    import jax

    from mvlp_jax.models.pretrainer import Pretrainer
    from mvlp_jax.models.vit import VIEW_TYPES
    from mvlp_jax.pretrain.visualize import Painter, Shown
    from tests.test_multitask import _micro

    config = _micro(objectives={"mae": 1.0, "dino": 1.0}, **{"data.max_views": 2})
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32)).astype(np.uint8)
    images = ((pixels / 255.0 - config.data.mean) / config.data.std)[..., None].astype(np.float32)
    key = jax.random.PRNGKey(0)
    params = nn.unbox(
        Pretrainer(config, 0).init(
            {"params": key, "masking": key, "dropout": key}, images, None, method=Pretrainer.init_all
        )["params"]
    )
    # the view-type embedding is not drawn at its init scale (0.02), where it would barely move the tokens
    params["encoder"]["view_embedding"] = np.eye(len(VIEW_TYPES), params["encoder"]["view_embedding"].shape[1])
    painter = Painter(config, 0)
    shown = lambda types: Shown(images, pixels, ["a", "b"], view_types=np.array(types, np.int32))
    frontal = painter.attention(params, shown([0, 0]))
    np.testing.assert_array_equal(painter.attention(params, shown([0, 0])), frontal)
    assert not np.array_equal(painter.attention(params, shown([VIEW_TYPES.index("lateral")] * 2)), frontal)


def test_an_mflag_run_without_a_masked_image_model_gets_attention_and_nearest_reports(pretrain_data):
    import flax.linen as nn
    import jax

    from mvlp_jax import configuration
    from mvlp_jax.models.pretrainer import Pretrainer
    from mvlp_jax.pretrain import train_step
    from mvlp_jax.pretrain.visualize import Painter, Shown
    from tests.pretrain_setup import micro_config

    config = micro_config(pretrain_data[0], pretrain_data[1], objectives={"mflag": 1.0})
    config.mflag.embed_dim, config.mflag.hidden_dim = 16, 32
    configuration.validate(config)
    batch = train_step.example_batch(config, 24, batch=4)
    key = jax.random.PRNGKey(0)
    params = nn.unbox(
        Pretrainer(config, 24).init(
            {"params": key, "masking": key, "dropout": key}, batch["image"], batch["target"], method=Pretrainer.init_all
        )["params"]
    )
    assert "masked_model" not in params
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 32, 32)).astype(np.uint8)
    images = ((pixels / 255.0 - config.data.mean) / config.data.std)[..., None].astype(np.float32)
    shown = Shown(images, pixels, ["s1", "s2", "s2", "s3"], rng.normal(size=(4, 24)).astype(np.float32))
    assert set(Painter(config, 24).draw(params, shown)) == {"attention", "nearest_reports"}
