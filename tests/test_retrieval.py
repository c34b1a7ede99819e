"""Image <-> report retrieval: ranks against brute force, and the evaluation binary's numbers on a run trained on
the shipped sample against a direct computation from the run's own embeddings."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import linear_probe
from mvlp_jax.data import transforms
from mvlp_jax.evaluation import evaluate
from mvlp_jax.evaluation.retrieval import ranks
from mvlp_jax.objectives import llm_contrastive
from mvlp_jax.pretrain import encoder as encoder_lib
from mvlp_jax.runtime import sharding
from tests.pretrain_setup import micro_config


def test_ranks_match_brute_force():
    rng = np.random.default_rng(0)
    image_study = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4])
    similarity = rng.normal(size=(len(image_study), 5))
    image_to_report, report_to_image = ranks(similarity, image_study)
    for i, s in enumerate(image_study):
        assert image_to_report[i] == 1 + sum(similarity[i, t] > similarity[i, s] for t in range(5))
    for s in range(5):
        best = min(
            1 + sum(similarity[j, s] > similarity[i, s] for j in range(len(image_study)))
            for i in np.flatnonzero(image_study == s)
        )
        assert report_to_image[s] == best


def _probe_config(data_dir: str, workdirs: str):
    c = linear_probe.get_config()
    c.evaluator, c.workdirs, c.data_dir = "retrieval", workdirs, data_dir
    c.dataset, c.test_split = "covid_notes", "test"
    c.bootstrap, c.batch_size = 50, 16
    return c


def test_retrieval_of_a_trained_run_equals_a_direct_computation(pretrain_data, contrastive_run, tmp_path):
    from mvlp_jax.data import built

    data_dir, emb, _ = pretrain_data
    results = evaluate.evaluate(_probe_config(data_dir, contrastive_run), str(tmp_path / "out"))
    (row,) = results["retrieval"]

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
    encoder = encoder_lib.load(contrastive_run, -1, mesh)
    builder, _, _ = built.open_builder(data_dir, "covid_notes")
    source = built.open_split(builder, "test")
    records = [source[i] for i in range(len(source))]
    images = np.stack(
        [
            transforms.normalise(transforms.center_crop_resize(transforms.decode_png(r["image"]), 32), 0.5, 0.25)
            for r in records
        ]
    )
    from mvlp_jax.data import targets

    table = targets.load_targets(emb, "mean")
    studies = sorted({r["study_id"].decode() for r in records})
    vectors = np.stack([table.vectors[table.rows()[s]] for s in studies]).astype(np.float32)
    z_img = np.asarray(
        encoder.model.apply(
            {"params": encoder.params}, jnp.asarray(images), train=False, method=llm_contrastive.embed_images
        )
    )
    z_txt = np.asarray(
        encoder.model.apply({"params": encoder.params}, jnp.asarray(vectors), method=llm_contrastive.embed_targets)
    )
    unit = lambda z: z / np.linalg.norm(z, axis=1, keepdims=True)
    similarity = unit(z_img) @ unit(z_txt).T
    own = np.array([studies.index(r["study_id"].decode()) for r in records])
    rank = np.array([1 + np.sum(similarity[i] > similarity[i, own[i]]) for i in range(len(records))])
    assert row["images"] == len(records) and row["studies"] == len(studies)
    for k in (1, 5, 10):
        np.testing.assert_allclose(row["image_to_report"][f"R@{k}"], np.mean(rank <= k))
        lo, hi = row["image_to_report"][f"R@{k}_ci95"]
        assert lo <= row["image_to_report"][f"R@{k}"] <= hi
    assert row["image_to_report"]["median_rank"] == np.median(rank)
    saved = json.load(open(tmp_path / "out" / "results.json"))["retrieval"][0]
    assert saved["report_to_image"] == row["report_to_image"]
    assert "image to report" in open(tmp_path / "out" / "results.md").read()


def test_runs_without_a_text_space_are_refused_by_name(pretrain_data, contrastive_run, tmp_path):
    from mvlp_jax.evaluation.shared_space import resolve
    from mvlp_jax.models.pretrainer import Pretrainer

    data_dir, emb, _ = pretrain_data
    for objectives in ({"mae": 1.0}, {"mae": 0.5, "dino": 0.5}):
        config = micro_config(data_dir, emb, objectives=objectives)
        encoder = encoder_lib.Encoder("run", config, Pretrainer(config, 24), {}, 1)
        with pytest.raises(
            ValueError,
            match=f"run was trained with {', '.join(sorted(objectives))}: none of its "
            "objectives declares an image-report space",
        ):
            resolve(encoder)
    with pytest.raises(ValueError, match="random_init has no text space"):
        evaluate.evaluate(_probe_config(data_dir, "random_init," + contrastive_run), str(tmp_path / "o2"))


def test_retrieval_on_a_split_without_reports_names_the_test_images_and_the_embeddings_key(
    nih_and_workdir, contrastive_run, tmp_path
):
    """The NIH sample has no reports: the message once called its test images 'training images' and suggested a
    pretraining key."""
    data_dir, _ = nih_and_workdir
    config = _probe_config(data_dir, contrastive_run)
    config.dataset, config.test_split = "nih_sample", "valid"
    with pytest.raises(
        ValueError,
        match=r"200 test images of nih_sample:1.0.0/valid \(200 studies\) have no LLM "
        r"embedding.*give --config.embeddings=\.\.\. holding the reports of",
    ):
        evaluate.evaluate(config, str(tmp_path))
