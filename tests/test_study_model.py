"""A study of several views read as one sequence: set-like over views of one type, deaf to padding, and a
one-view study is the single-image path."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from mvlp_jax import configuration
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.models.vit import VIEW_TYPES

TARGET_DIM = 24


def _model(scan: bool = False) -> tuple[Pretrainer, dict]:
    c = pretrain.get_config("demo")
    c.model.variant, c.model.image_size, c.model.pool_heads, c.model.scan = "mu/8", 32, 2, scan
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 32, 1, 2
    c.data.max_views = 3
    configuration.validate(c)
    model = Pretrainer(c, TARGET_DIM)
    key = jax.random.PRNGKey(0)
    params = model.init({"params": key, "masking": key, "dropout": key}, jnp.zeros((2, 32, 32, 1)),
                        jnp.zeros((2, TARGET_DIM)), method=Pretrainer.init_all)["params"]
    return model, nn.unbox(params)


def _study(model, params, images, types, present, pooling="map"):
    return np.asarray(model.apply({"params": params}, jnp.asarray(images), jnp.asarray(types), jnp.asarray(present),
                                  pooling, method=Pretrainer.study_features))


@pytest.mark.parametrize("pooling", ["map", "mean", "cls"])
def test_views_of_one_type_are_a_set_and_padding_changes_nothing(pooling):
    model, params = _model()
    assert params["encoder"]["view_embedding"].shape == (len(VIEW_TYPES), 64)
    images = np.random.default_rng(0).normal(size=(2, 3, 32, 32, 1)).astype(np.float32)
    frontal = np.zeros((2, 3), np.int32)
    every = np.ones((2, 3), bool)
    base = _study(model, params, images, frontal, every, pooling)
    np.testing.assert_allclose(_study(model, params, images[:, [2, 0, 1]], frontal, every, pooling), base,
                               rtol=1e-4, atol=1e-5)
    # a padded third view, whatever its pixels, is neither attended to nor pooled
    two = _study(model, params, images[:, :2], frontal[:, :2], every[:, :2], pooling)
    noise = images.copy()
    noise[:, 2] = 100.0
    padded = _study(model, params, noise, frontal, np.array([[True, True, False]] * 2), pooling)
    np.testing.assert_allclose(padded, two, rtol=1e-4, atol=1e-5)
    assert not np.allclose(two, base, atol=1e-4)  # the third view, when present, does count
    # the view type is information: a lateral view reads differently from the same pixels as frontal
    lateral = frontal.copy()
    lateral[:, 1] = VIEW_TYPES.index("lateral")
    assert not np.allclose(_study(model, params, images, lateral, every, pooling), base, atol=1e-5)


def test_a_one_view_study_is_the_single_image_path_and_scan_reads_studies_too():
    model, params = _model()
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 1)).astype(np.float32)
    single = np.asarray(model.apply({"params": params}, jnp.asarray(images), "map", method=Pretrainer.features))
    study = _study(model, params, images[:, None], np.zeros((2, 1), np.int32), np.ones((2, 1), bool))
    np.testing.assert_allclose(study, single, rtol=1e-5, atol=1e-6)

    scanned, scanned_params = _model(scan=True)
    views = np.random.default_rng(2).normal(size=(2, 2, 32, 32, 1)).astype(np.float32)
    out = _study(scanned, scanned_params, views, np.zeros((2, 2), np.int32), np.array([[True, False]] * 2))
    first = _study(scanned, scanned_params, views[:, :1], np.zeros((2, 1), np.int32), np.ones((2, 1), bool))
    np.testing.assert_allclose(out, first, rtol=1e-4, atol=1e-5)


def test_training_on_studies_is_refused_until_the_pipeline_feeds_them(tmp_path):
    from mvlp_jax import train

    c = pretrain.get_config("demo")
    c.data.max_views = 2
    with pytest.raises(ValueError, match="max_views=2: the encoder reads studies"):
        train.train(c, str(tmp_path / "run"))
    c.model.encoder = "vitdet"
    with pytest.raises(ValueError, match="needs model.encoder='vit'"):
        configuration.validate(c)
