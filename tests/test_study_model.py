"""A study of several views read as one sequence: set-like over views of one type, deaf to padding, and a
one-view study is the single-image path."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from mvlp_jax import configuration
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.models.vit import VIEW_TYPES
from mvlp_jax.pretrain import encoder as encoder_lib

TARGET_DIM = 24


def _model(scan: bool = False, max_views: int = 3) -> tuple[Pretrainer, dict]:
    c = pretrain.get_config("demo")
    c.model.variant, c.model.image_size, c.model.pool_heads, c.model.scan = "mu/8", 32, 2, scan
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 32, 1, 2
    c.data.max_views = max_views
    configuration.validate(c)
    model = Pretrainer(c, TARGET_DIM)
    key = jax.random.PRNGKey(0)
    params = model.init(
        {"params": key, "masking": key, "dropout": key},
        jnp.zeros((2, 32, 32, 1)),
        jnp.zeros((2, TARGET_DIM)),
        method=Pretrainer.init_all,
    )["params"]
    return model, nn.unbox(params)


def _study(model, params, images, types, present, pooling="map"):
    return np.asarray(
        model.apply(
            {"params": params},
            jnp.asarray(images),
            jnp.asarray(types),
            jnp.asarray(present),
            pooling,
            method=Pretrainer.study_features,
        )
    )


@pytest.mark.parametrize("pooling", ["map", "mean", "cls"])
def test_views_of_one_type_are_a_set_and_padding_changes_nothing(pooling):
    model, params = _model()
    assert params["encoder"]["view_embedding"].shape == (len(VIEW_TYPES), 64)
    images = np.random.default_rng(0).normal(size=(2, 3, 32, 32, 1)).astype(np.float32)
    frontal = np.zeros((2, 3), np.int32)
    every = np.ones((2, 3), bool)
    base = _study(model, params, images, frontal, every, pooling)
    np.testing.assert_allclose(
        _study(model, params, images[:, [2, 0, 1]], frontal, every, pooling), base, rtol=1e-4, atol=1e-5
    )
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


def test_an_encoder_of_single_images_gives_a_study_the_mean_of_its_present_views():
    model, params = _model(max_views=1)
    assert "view_embedding" not in params["encoder"]
    images = np.random.default_rng(4).normal(size=(2, 3, 32, 32, 1)).astype(np.float32)
    each = [
        np.asarray(model.apply({"params": params}, jnp.asarray(images[:, v]), "mean", method=Pretrainer.features))
        for v in range(3)
    ]
    present = np.array([[True, True, False], [True, False, False]])
    study = _study(model, params, images, np.zeros((2, 3), np.int32), present, "mean")
    np.testing.assert_allclose(study, np.stack([(each[0][0] + each[1][0]) / 2, each[0][1]]), rtol=1e-4, atol=1e-5)


def test_a_vitdet_windows_each_view_and_its_global_blocks_span_the_study():
    from mvlp_jax.models.vitdet import ViTDet

    tiny = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8, window_size=2, view_types=3)
    images = np.random.default_rng(5).normal(size=(2, 2, 32, 32, 1)).astype(np.float32)
    changed = images.copy()
    changed[:, 1] += 3.0  # the second view only
    types, present = np.zeros((2, 2), np.int32), np.ones((2, 2), bool)

    def tokens(model, x, mask=present):
        params = model.init(
            jax.random.PRNGKey(0), jnp.asarray(images), view_type=jnp.asarray(types), view_mask=jnp.asarray(present)
        )
        return np.asarray(
            model.apply(params, jnp.asarray(x), view_type=jnp.asarray(types), view_mask=jnp.asarray(mask))
        )

    windowed = ViTDet(**tiny, global_blocks=())  # every block windowed: the first view never sees the second
    np.testing.assert_allclose(tokens(windowed, changed)[:, :16], tokens(windowed, images)[:, :16], atol=1e-6)
    mixed = ViTDet(**tiny, global_blocks=(1,))  # a global block: it does
    assert not np.allclose(tokens(mixed, changed)[:, :16], tokens(mixed, images)[:, :16], atol=1e-4)
    padded = np.array([[True, False]] * 2)  # unless the second view is padding
    np.testing.assert_allclose(tokens(mixed, changed, padded)[:, :16], tokens(mixed, images, padded)[:, :16], atol=1e-6)
    single = ViTDet(**tiny, global_blocks=(1,))
    params = single.init(
        jax.random.PRNGKey(0), jnp.asarray(images), view_type=jnp.asarray(types), view_mask=jnp.asarray(present)
    )
    np.testing.assert_allclose(
        np.asarray(single.apply(params, jnp.asarray(images[:, 0]))),
        np.asarray(single.apply(params, jnp.asarray(images[:, :1]))),
        atol=1e-6,
    )


def test_studies_group_frontal_first_then_laterals_and_pad_the_rest():
    from mvlp_jax.data.studies import group

    records, types, order = group(
        ["a", "b", "a", "a", "c", "a"], ["LATERAL", "PA", "AP supine", "OBLIQUE", "LL", "PA"], max_views=3
    )
    assert order == ["a", "b", "c"]
    assert records.tolist() == [[2, 5, 0], [1, -1, -1], [4, -1, -1]]  # a's oblique view (3) is left out
    assert types.tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]


def test_an_image_without_a_study_id_is_a_study_of_its_own():
    """Blank study ids once merged the images of every patient without one into a single 'study'."""
    from mvlp_jax.data.studies import group, largest

    records, _, order = group(["a", "", "a", "", " "], ["PA", "PA", "LATERAL", "PA", "PA"], max_views=2)
    assert order == ["a", "", "", ""] and records.tolist() == [[0, 2], [1, -1], [3, -1], [4, -1]]
    assert largest(["a", "", "a", "", ""]) == 2 and largest(["", ""]) == 1


def test_max_views_beyond_the_largest_study_is_clamped_and_the_input_memory_estimated(tmp_path, capsys):
    """data.max_views=64 on studies of at most 2 views padded 62 empty views per study (killed at 24 GB)."""
    from mvlp_jax.pretrain import startup, train
    from tests.pretrain_setup import micro_config, write_targets

    data_dir = _study_set(str(tmp_path))
    write_targets(data_dir, str(tmp_path / "emb"), dataset="studies")
    config = micro_config(data_dir, str(tmp_path / "emb"), total_steps=1)
    config.data.dataset, config.data.max_views, config.data.batch_size = "studies", 64, 8
    train.train(config, str(tmp_path / "run"))
    assert "data.max_views=64, but its largest study has 2 images: clamped to 2" in capsys.readouterr().out
    assert json.load(open(tmp_path / "run" / "config.json"))["data"]["max_views"] == 2
    config.data.max_views, config.data.batch_size, config.model.image_size = 64, 1 << 16, 224
    with pytest.raises(
        ValueError,
        match=r"the input pipeline holds ~.* GiB .* of the .* GiB this host has "
        r"available: lower data.batch_size, data.prefetch or data.num_threads, or "
        r"data.max_views",
    ):
        startup.check_host_memory(config, 24, processes=1)


def _noise(rng: np.random.Generator, view: str) -> np.ndarray:
    return rng.integers(0, 256, (40, 40)).astype(np.uint8)


def _study_set(root, pixels=_noise) -> str:
    """28 studies of 40 px grey images, `pixels(rng, view)` (16 train, 12 test: a test split large enough to
    estimate a metric): the even ones a PA and a lateral view and label 1, the odd ones a PA alone and label 0."""
    from PIL import Image

    from data_prep.build_dataset import build

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"))
    rows = ["image,study,view,split,two_views"]
    for i in range(28):
        for view in ("PA", "LATERAL") if i % 2 == 0 else ("PA",):
            name = f"images/{i}_{view}.png"
            Image.fromarray(pixels(rng, view)).save(os.path.join(root, name))
            rows.append(f"{name},s{i},{view},{'train' if i < 16 else 'test'},{int(i % 2 == 0)}")
    with open(os.path.join(root, "manifest.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    build(
        "csv",
        root,
        os.path.join(root, "tfds"),
        name="studies",
        study_column="study",
        group_column="study",
        view_column="view",
        views="all",
        image_size=0,
        split_column="split",
        label_columns="two_views",
    )
    return os.path.join(root, "tfds")


def test_a_study_batch_holds_its_views_and_training_reads_studies(tmp_path):
    from mvlp_jax.data import built, pipeline
    from mvlp_jax.evaluation import features
    from mvlp_jax.objectives.mae import masked
    from mvlp_jax.pretrain import train
    from tests.pretrain_setup import micro_config, write_targets

    data_dir = _study_set(str(tmp_path))
    write_targets(data_dir, str(tmp_path / "emb"), dataset="studies")
    config = micro_config(data_dir, str(tmp_path / "emb"), total_steps=2)
    config.data.dataset, config.data.max_views, config.data.batch_size = "studies", 2, 8
    records = pipeline.open_records(config)
    source = records.source
    assert records.indices.shape[1] == 2 and len(records.indices) == len(
        {source[i]["study_id"] for i in range(len(source))}
    )
    batch = next(iter(pipeline.TrainIterator(pipeline.local_batches(records, config, 0, 1), config)))
    assert batch["image"].shape == (8, 2, 32, 32, 1) and batch["target"].shape == (8, 24)
    lateral = batch["view_mask"][:, 1]
    assert lateral.any() and not lateral.all() and (batch["view_type"][lateral, 1] == 1).all()
    assert np.abs(batch["image"][~lateral, 1]).max() == 0  # padding slots hold no pixels

    model, params = _model()
    key = jax.random.PRNGKey(3)
    loss = lambda images: float(
        model.apply(
            {"params": params},
            jnp.asarray(images),
            False,
            None,
            jnp.asarray(batch["view_mask"]),
            rngs={"masking": key},
            method=masked,
        )["loss"]
    )
    noisy = batch["image"].copy()
    noisy[~lateral, 1] = 50.0
    assert loss(noisy) == pytest.approx(loss(batch["image"]), rel=1e-6)  # padded views are not reconstructed

    workdir = str(tmp_path / "run")
    assert train.train(config, workdir).last_step == 2
    encoder = encoder_lib.load(workdir, -1, _mesh())
    assert encoder.params["encoder"]["view_embedding"].shape[0] == len(VIEW_TYPES)
    builder, _, _ = built.open_builder(data_dir, "studies")
    single = features.extract(
        encoder, built.open_split(builder, "train"), "mean", 8, _mesh(), str(tmp_path / "f"), "studies/train", "x"
    )
    assert single.shape[0] == len(built.open_split(builder, "train")) and np.isfinite(single).all()

    # the Hugging Face export reads one image as a study of one frontal view, as our single-image path does
    import torch
    import transformers

    from mvlp_jax.tools import export

    one_device = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model"))
    encoder = encoder_lib.load(workdir, -1, one_device)
    export.export(encoder, str(tmp_path / "hf"))
    hf = transformers.ViTMAEModel.from_pretrained(str(tmp_path / "hf")).eval()
    images = np.asarray(batch["image"][:, 0])
    ours = np.asarray(
        encoder.model.apply({"params": encoder.params}, jnp.asarray(images), method=lambda m, x: m.encoder(x))
    )
    with torch.no_grad():
        theirs = hf(
            pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
            noise=torch.arange(16, dtype=torch.float32).expand(len(images), -1),
        ).last_hidden_state.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)

    # probes: one row per test image, or per test study (12 studies, 18 images)
    from configs import linear_probe
    from mvlp_jax.evaluation import evaluate

    probe = linear_probe.get_config(None)
    probe.data_dir, probe.dataset, probe.val_split, probe.workdirs = data_dir, "studies", "", f"{workdir},random_init"
    probe.label_fractions, probe.bootstrap = (1.0,), 20
    images = evaluate.evaluate(probe, str(tmp_path / "images"))
    assert [row["test_cases"] for row in images["checkpoints"]] == [18, 18]
    probe.study_views = 2
    studied = evaluate.evaluate(probe, str(tmp_path / "studies"))
    assert [row["test_cases"] for row in studied["checkpoints"]] == [12, 12]
    assert all(np.isfinite(row["mauc"]) for row in studied["checkpoints"])
    probe.mode = "finetune"
    with pytest.raises(ValueError, match="study_views"):
        evaluate.evaluate(probe, str(tmp_path / "refused"))


def test_dino_on_studies_pairs_crops_of_different_views_and_trains(tmp_path):
    """Each PA is dark and each lateral bright, so a crop's brightness says which view it was cut from."""
    from mvlp_jax.data import pipeline
    from mvlp_jax.objectives import dino, registry
    from mvlp_jax.pretrain import train
    from tests.pretrain_setup import micro_config

    data_dir = _study_set(str(tmp_path), lambda rng, view: np.full((40, 40), 40 if view == "PA" else 200, np.uint8))
    config = micro_config(
        data_dir,
        "",
        total_steps=2,
        objectives={"dino": 1.0, "mae": 1.0},
        **{
            "dino.local_size": 16,
            "dino.num_local_crops": 3,
            "dino.out_dim": 64,
            "dino.hidden_dim": 32,
            "dino.bottleneck_dim": 16,
        },
    )
    config.data.dataset, config.data.max_views, config.data.batch_size = "studies", 2, 8
    records = pipeline.open_records(config)
    batch = next(iter(pipeline.TrainIterator(pipeline.local_batches(records, config, 0, 1), config)))
    assert batch["global_views"].shape == (8, 2, 32, 32, 1) and batch["local_views"].shape == (8, 3, 16, 16, 1)
    two_views = batch["view_mask"][:, 1]
    assert two_views.any() and not two_views.all()
    lateral = VIEW_TYPES.index("lateral")
    for crops, types in (
        (batch["global_views"], batch["global_view_types"]),
        (batch["local_views"], batch["local_view_types"]),
    ):
        bright = crops.mean(axis=(2, 3, 4)) > 0  # normalised: 40 -> about -1.4, 200 -> about +1.1
        np.testing.assert_array_equal(bright, types == lateral)  # each crop carries its own view's type
        assert not bright[~two_views].any()  # a study of one view gives crops of that view only
    # the two global crops of a study of two views are one of each: the teacher's targets span the views
    assert (batch["global_view_types"][two_views].sum(axis=1) == lateral).all()

    # the student reads a crop's view type: the same crop as a lateral view gives other logits
    crops = jnp.asarray(batch["global_views"][:, 0])
    head = Pretrainer(config, 0)
    head_params = nn.unbox(
        head.init(
            {"params": jax.random.PRNGKey(0), "masking": jax.random.PRNGKey(0)}, crops, method=Pretrainer.init_all
        )["params"]
    )
    embed = lambda types: np.asarray(
        head.apply({"params": head_params}, crops, False, jnp.asarray(types), method=dino.embed)
    )
    assert head_params["encoder"]["view_embedding"].shape[0] == len(VIEW_TYPES)
    assert not np.allclose(embed(np.zeros(8, np.int32)), embed(np.full(8, lateral, np.int32)), atol=1e-6)

    outcome = train.train(config, str(tmp_path / "run"))  # MAE on each view, DINO across them
    assert outcome.last_step == 2 and int(outcome.state.nonfinite_total) == 0
    assert outcome.state.extra["teacher"]["encoder"]["view_embedding"].shape[0] == len(VIEW_TYPES)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert all("studies_per_s" in row and "images_per_s" not in row for row in logged)  # its batch counts studies
    config.objectives = {"query_box": 1.0, "mae": 1.0}
    with pytest.raises(ValueError, match="query_box build their own views of one image.*use dino, "):
        registry.check(config)


def _mesh():
    from mvlp_jax.runtime import sharding

    return jax.sharding.Mesh(np.array(jax.devices()).reshape(-1, 1, 1), sharding.AXES)
