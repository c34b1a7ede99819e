"""M-FLAG's heads normalise by batch statistics; evaluation fixes them to those of a whole set, so retrieval and
zero-shot scores of an M-FLAG run equal a numpy computation of the heads over the set, whatever the batch size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mvlp_jax.data import transforms
from mvlp_jax.evaluation import evaluate, zero_shot, zero_shot_prompts
from mvlp_jax.models.heads import BatchStatNorm
from mvlp_jax.objectives import mflag
from mvlp_jax.pretrain import encoder as encoder_lib
from mvlp_jax.runtime import sharding
from tests.pretrain_setup import micro_config
from tests.test_retrieval import _probe_config as retrieval_config
from tests.test_zero_shot import _config as zero_shot_config
from tests.test_zero_shot import _planted

EPS = 1e-5


def _normalise(h: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return (h - reference.mean(0)) / np.sqrt(reference.var(0) + EPS)


def _head(p: dict, x: np.ndarray, reference: np.ndarray, out_norm: bool) -> np.ndarray:
    """ProjectionHead(kind='mlp', norm='batch') in numpy, every norm with the statistics of `reference` as it
    flows through the same layers."""
    gelu = lambda h: np.asarray(jax.nn.gelu(jnp.asarray(h)))  # flax's nn.gelu (tanh form)
    layer = lambda h, q: h @ np.asarray(q["kernel"]) + np.asarray(q["bias"])
    h, r = layer(x, p["hidden_0"]), layer(reference, p["hidden_0"])
    affine = lambda h: h * np.asarray(p["norm_0"]["scale"]) + np.asarray(p["norm_0"]["bias"])
    h, r = gelu(affine(_normalise(h, r))), gelu(affine(_normalise(r, r)))
    h, r = layer(h, p["out"]), layer(r, p["out"])
    return _normalise(h, r) if out_norm else h


def test_batch_stat_norm_records_a_sets_statistics_and_applies_them_to_any_batch():
    rng = np.random.default_rng(0)
    reference, queries = rng.normal(2.0, 3.0, size=(64, 5)), rng.normal(size=(3, 5))
    norm = BatchStatNorm(use_affine=False)
    _, stats = norm.apply({}, jnp.asarray(reference), mutable=["set_stats"])
    fixed = lambda x: np.asarray(norm.apply(dict(stats), jnp.asarray(x)))
    np.testing.assert_allclose(fixed(queries), _normalise(queries, reference), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fixed(queries[:1]), fixed(queries)[:1], rtol=1e-6)
    # without statistics it normalises by the batch it sees (training), and init records nothing
    np.testing.assert_allclose(norm.apply({}, jnp.asarray(queries)), _normalise(queries, queries), rtol=1e-4, atol=1e-5)
    assert "set_stats" not in norm.init(jax.random.key(0), jnp.asarray(queries))


@pytest.fixture(scope="module")
def mflag_run(pretrain_data, tmp_path_factory):
    from mvlp_jax.pretrain import train

    data_dir, emb, _ = pretrain_data
    workdir = str(tmp_path_factory.mktemp("mflag_run"))
    config = micro_config(data_dir, emb, objectives={"mflag": 1.0}, total_steps=2)
    config.mflag.embed_dim, config.mflag.hidden_dim = 16, 32
    train.train(config, workdir)
    return workdir


def _images(encoder, source) -> np.ndarray:
    size = encoder.config.model.image_size
    return np.stack(
        [
            transforms.normalise(
                transforms.center_crop_resize(transforms.decode_png(source[i]["image"]), size), 0.5, 0.25
            )
            for i in range(len(source))
        ]
    )


def _pooled_and_params(workdir: str, source):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
    encoder = encoder_lib.load(workdir, -1, mesh)
    pooled = np.asarray(
        encoder.model.apply(
            {"params": encoder.params}, jnp.asarray(_images(encoder, source)), train=False, method=mflag.pooled
        )
    )
    return pooled, jax.tree.map(np.asarray, encoder.params)


def test_mflag_retrieval_equals_a_numpy_computation_over_the_whole_split(pretrain_data, mflag_run, tmp_path):
    from mvlp_jax.data import built, targets

    data_dir, emb, _ = pretrain_data
    rows = []
    for batch_size in (16, 8):  # the heads see the whole split, not a batch: the numbers cannot move
        config = retrieval_config(data_dir, mflag_run)
        config.batch_size = batch_size
        rows.append(evaluate.evaluate(config, str(tmp_path / str(batch_size)))["retrieval"][0])
    assert rows[0]["image_to_report"] == rows[1]["image_to_report"]
    assert rows[0]["report_to_image"] == rows[1]["report_to_image"]

    source = built.open_split(built.open_builder(data_dir, "covid_notes")[0], "test")
    pooled, params = _pooled_and_params(mflag_run, source)
    table = targets.load_targets(emb, "mean")
    image_studies = [source[i]["study_id"].decode() for i in range(len(source))]
    studies = sorted(set(image_studies))
    vectors = np.stack([table.vectors[table.rows()[s]] for s in studies]).astype(np.float32)
    z_img = _head(params["mflag_image_proj"], pooled, pooled, out_norm=True)
    z_txt = _head(params["mflag_text_proj"], vectors, vectors, out_norm=False)
    unit = lambda z: z / np.linalg.norm(z, axis=1, keepdims=True)
    similarity = unit(z_img) @ unit(z_txt).T
    own = np.array([studies.index(s) for s in image_studies])
    rank = np.array([1 + np.sum(similarity[i] > similarity[i, own[i]]) for i in range(len(own))])
    for k in (1, 5, 10):
        np.testing.assert_allclose(rows[0]["image_to_report"][f"R@{k}"], np.mean(rank <= k))
    assert rows[0]["image_to_report"]["median_rank"] == np.median(rank)


def test_mflag_zero_shot_normalises_prompts_by_the_training_reports(
    pretrain_data, nih_and_workdir, mflag_run, tmp_path, monkeypatch
):
    from mvlp_jax.data import built, targets

    _, emb, _ = pretrain_data
    data_dir, _ = nih_and_workdir
    monkeypatch.setattr(zero_shot, "llm_embedder", lambda manifest, pooling, llm: _planted)
    (row,) = evaluate.evaluate(zero_shot_config(data_dir, mflag_run), str(tmp_path))["zero_shot"]

    source = built.open_split(built.open_builder(data_dir, "nih_sample")[0], "valid")
    pooled, params = _pooled_and_params(mflag_run, source)
    reports = targets.load_targets(emb, "mean").vectors.astype(np.float32)  # fewer than 4096: all of them
    unit = lambda z: z / np.linalg.norm(z, axis=-1, keepdims=True)
    z_img = unit(_head(params["mflag_image_proj"], pooled, pooled, out_norm=True))
    labels = np.stack([source[i]["labels"] for i in range(len(source))])
    checked = 0
    for j, name in enumerate(row["auc"]):
        positive, negative = zero_shot_prompts.prompts(name, "pair")
        set_embedding = lambda texts: unit(
            unit(_head(params["mflag_text_proj"], _planted(list(texts)), reports, out_norm=False)).mean(0)
        )
        margin = z_img @ set_embedding(positive) - z_img @ set_embedding(negative)
        keep = labels[:, j] != -1
        truth = labels[keep, j] == 1
        if truth.all() or not truth.any():
            continue
        one_pair = 1 / (truth.sum() * (~truth).sum())  # float32 rounding may flip one near-tied pair
        np.testing.assert_allclose(row["auc"][name], roc_auc_score(truth, margin[keep]), atol=one_pair + 1e-9)
        checked += 1
    assert checked >= 5


def test_a_split_of_few_patients_is_scored_only_without_intervals():
    from mvlp_jax.evaluation import statistics

    one_patient = np.array(["p1"] * 48)  # a CT test patient's slices
    with pytest.raises(ValueError, match="48 test cases of 1 patients.*bootstrap=0 reports the metric"):
        statistics.require(one_patient, "sts_ct/test")
    statistics.require(one_patient, "sts_ct/test", intervals=False)
    with pytest.raises(ValueError, match=r"3 test cases of 1 patients.*5 patients\)$"):
        statistics.require(one_patient[:3], "sts_ct/test", intervals=False)
