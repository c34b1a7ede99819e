"""Evaluation: metrics against sklearn and by hand, bootstrap coverage, probe recovery, the binary end to
end on the real NIH sample, 1 device == 8 devices, and clear errors."""
import os

import jax
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from mvlp_jax import evaluate, features, metrics, probe, sharding, train
from tests.pretrain_setup import micro_config


def test_auc_and_ap_equal_sklearn_on_random_and_tied_data():
    rng = np.random.default_rng(0)
    for trial in range(20):
        y = rng.integers(0, 2, 300)
        score = rng.normal(size=300) + y * trial / 10
        tied = np.round(score, 1)  # many ties
        for s in (score, tied, rng.integers(0, 3, 300).astype(float)):
            assert abs(metrics.roc_auc(y, s) - roc_auc_score(y, s)) < 1e-9
            assert abs(metrics.average_precision(y, s) - average_precision_score(y, s)) < 1e-9
    assert np.isnan(metrics.roc_auc(np.ones(5), np.arange(5)))


def test_exact_match_accuracy_by_hand():
    labels = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]])
    probs = np.array([[0.9, 0.2, 0.6], [0.1, 0.7, 0.8], [0.5, 0.5, 0.49], [0.2, 0.4, 0.1]])
    mask = np.ones_like(labels, bool)
    # case 0 all right; case 1 label 1 wrong; case 2 all right (0.5 counts as positive); case 3 label 1 wrong
    assert metrics.exact_match_accuracy(labels, probs, mask) == 0.5
    mask[1, 1] = False  # an ignored (uncertain) label cannot make a case wrong
    assert metrics.exact_match_accuracy(labels, probs, mask) == 0.75


def test_patient_bootstrap_interval_covers_the_true_auc_at_about_95_percent():
    from scipy.stats import norm

    rng = np.random.default_rng(1)
    d = 1.0
    true_auc = norm.cdf(d / np.sqrt(2))  # AUC of N(d,1) vs N(0,1)
    covered = 0
    trials = 120
    for t in range(trials):
        y = rng.integers(0, 2, 200)
        score = rng.normal(size=200) + d * y
        ci = metrics.bootstrap_ci(y[:, None], score[:, None], np.ones((200, 1), bool), np.arange(200), 300, seed=t)
        covered += ci["mauc"][0] <= true_auc <= ci["mauc"][1]
    assert 0.88 <= covered / trials <= 0.99, covered / trials


def test_probe_recovers_a_planted_signal_and_not_noise():
    rng = np.random.default_rng(2)
    n, d, labels = 600, 32, 4
    x = rng.normal(size=(n, d))
    w = rng.normal(size=(d, labels))
    y = (x @ w + 0.3 * rng.normal(size=(n, labels)) > 0).astype(np.float32)
    m = np.ones_like(y, bool)
    fitted = probe.fit(x[:400], y[:400], m[:400], x[400:500], y[400:500], m[400:500])
    assert metrics.mean_auc(y[500:], fitted.predict(x[500:]), m[500:]) > 0.95
    noise = rng.integers(0, 2, size=(n, labels)).astype(np.float32)
    fitted = probe.fit(x[:400], noise[:400], m[:400], x[400:500], noise[400:500], m[400:500])
    assert abs(metrics.mean_auc(noise[500:], fitted.predict(x[500:]), m[500:]) - 0.5) < 0.1


@pytest.fixture(scope="module")
def nih_and_workdir(pretrain_data, tmp_path_factory):
    """The shipped real NIH sample at 64 px, and a micro pretraining workdir (LLM contrastive + MAE)."""
    from data_prep.build_dataset import build
    from mvlp_jax.demo import DATASETS

    root = tmp_path_factory.mktemp("eval")
    options = dict(DATASETS["nih_sample"], image_size=64)
    build("csv", options.pop("input_dir"), str(root / "tfds"), name="nih_sample", **options)
    data_dir, emb_dir, _ = pretrain_data
    workdir = str(root / "pretrain")
    train.train(micro_config(data_dir, emb_dir, total_steps=4), workdir)
    return str(root / "tfds"), workdir


def _probe_config(data_dir, workdirs):
    import sys

    from tests.conftest import REPO
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import linear_probe

    c = linear_probe.get_config("nih_sample")
    c.data_dir, c.workdirs, c.bootstrap, c.batch_size = data_dir, workdirs, 100, 32
    return c


def test_evaluates_random_init_and_a_checkpoint_on_the_real_nih_sample(nih_and_workdir, tmp_path):
    data_dir, workdir = nih_and_workdir
    config = _probe_config(data_dir, f"random_init,{workdir}")
    config.label_fractions = (1.0, 0.5)
    results = evaluate.evaluate(config, str(tmp_path))
    rows = results["checkpoints"]
    assert [(r["name"], r["label_fraction"]) for r in rows] == [("random_init", 1.0), ("random_init", 0.5),
                                                                ("pretrain", 1.0), ("pretrain", 0.5)]
    assert rows[2]["step"] == 4 and rows[0]["test_cases"] == 200 and rows[1]["train_cases"] < rows[0]["train_cases"]
    for r in rows:
        assert 0 <= r["mauc"] <= 1 and r["ci95"]["mauc"][0] <= r["mauc"] <= r["ci95"]["mauc"][1]
        assert len(r["auc"]) == 14
    table = open(tmp_path / "results.md").read()
    assert "| random_init | 0 | 100% |" in table and "pretrain vs random_init" in table
    assert os.path.exists(tmp_path / "results.json") and os.path.exists(tmp_path / "auc_per_label.png")
    assert any(f.startswith("roc_") for f in os.listdir(tmp_path))


def test_features_on_one_and_eight_devices_agree(nih_and_workdir, tmp_path):
    data_dir, workdir = nih_and_workdir
    source, _, where = features.labelled_split(data_dir, "nih_sample", "valid")
    out = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = jax.sharding.Mesh(np.array(devices).reshape(-1, 1, 1), sharding.AXES)
        encoder = features.load_encoder(workdir, -1, mesh)
        out.append(features.extract(encoder, source, "map", 24, mesh, str(tmp_path / str(len(devices))), where))
    assert out[0].shape == (200, 64)
    np.testing.assert_allclose(out[1], out[0], rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named(nih_and_workdir, pretrain_data, tmp_path):
    data_dir, workdir = nih_and_workdir
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not a pretraining workdir"):
        evaluate.evaluate(_probe_config(data_dir, str(empty)), str(tmp_path / "o1"))
    no_labels = _probe_config(pretrain_data[0], workdir)
    no_labels.dataset, no_labels.test_split = "covid_notes", "test"
    with pytest.raises(ValueError, match="covid_notes:1.0.0 has no labels"):
        evaluate.evaluate(no_labels, str(tmp_path / "o2"))
    finetune = _probe_config(data_dir, workdir)
    finetune.mode = "finetune"
    with pytest.raises(ValueError, match="'mode' = 'finetune'"):
        evaluate.evaluate(finetune, str(tmp_path / "o3"))
