"""Evaluation: metrics against sklearn and by hand, bootstrap coverage, probe recovery, the binary end to
end on the real NIH sample, 1 device == 8 devices, and clear errors."""

import os

import jax
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from mvlp_jax.evaluation import evaluate, features, metrics, probe, statistics
from mvlp_jax.pretrain import encoder as encoder_lib
from mvlp_jax.pretrain import train
from mvlp_jax.runtime import sharding
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
        ci = statistics.estimate(
            [lambda i, y=y, score=score: metrics.roc_auc(y[i], score[i])], np.arange(200), 300, seed=t
        )["ci95"]
        covered += ci[0] <= true_auc <= ci[1]
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


def _probe_config(data_dir, workdirs):

    from configs import linear_probe

    c = linear_probe.get_config("nih_sample")
    c.data_dir, c.workdirs, c.bootstrap, c.batch_size = data_dir, workdirs, 100, 32
    return c


def test_evaluates_random_init_and_a_checkpoint_on_the_real_nih_sample(nih_and_workdir, tmp_path):
    data_dir, workdir = nih_and_workdir
    config = _probe_config(data_dir, f"random_init,{workdir}")
    config.label_fractions = (1.0, 0.5)
    results = evaluate.evaluate(config, str(tmp_path))
    rows = results["checkpoints"]
    assert [(r["name"], r["label_fraction"]) for r in rows] == [
        ("random_init", 1.0),
        ("random_init", 0.5),
        ("pretrain", 1.0),
        ("pretrain", 0.5),
    ]
    assert rows[2]["step"] == 4 and rows[0]["test_cases"] == 200 and rows[1]["train_cases"] < rows[0]["train_cases"]
    for r in rows:
        assert 0 <= r["mauc"] <= 1 and r["ci95"]["mauc"][0] <= r["mauc"] <= r["ci95"]["mauc"][1]
        assert len(r["auc"]) == 14
    table = open(tmp_path / "results.md").read()
    assert f"| random_init | 0 | 100% ({rows[0]['train_cases']} cases) | linear |" in table
    assert "pretrain vs random_init" in table
    assert os.path.exists(tmp_path / "results.json") and os.path.exists(tmp_path / "auc_per_label.png")
    assert any(f.startswith("roc_") for f in os.listdir(tmp_path))


def test_features_on_one_and_eight_devices_agree(nih_and_workdir, tmp_path):
    data_dir, workdir = nih_and_workdir
    source, _, where = features.labelled_split(data_dir, "nih_sample", "valid")
    out = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = jax.sharding.Mesh(np.array(devices).reshape(-1, 1, 1), sharding.AXES)
        encoder = encoder_lib.load(workdir, -1, mesh)
        out.append(
            features.extract(
                encoder,
                source,
                "map",
                24,
                mesh,
                str(tmp_path / str(len(devices))),
                where,
                features.split_fingerprint(data_dir, "nih_sample", "valid"),
            )
        )
    assert out[0].shape == (200, 64)
    np.testing.assert_allclose(out[1], out[0], rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named(nih_and_workdir, pretrain_data, tmp_path):
    data_dir, workdir = nih_and_workdir
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not a pretraining workdir"):
        evaluate.evaluate(_probe_config(data_dir, str(empty)), str(tmp_path / "o1"))
    with pytest.raises(ValueError, match="has no DINO teacher"):
        one_device = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
        encoder_lib.load(workdir, -1, one_device, teacher=True)
    no_teacher = _probe_config(data_dir, workdir)
    no_teacher.teacher = True
    with pytest.raises(ValueError, match="has no DINO teacher"):
        evaluate.evaluate(no_teacher, str(tmp_path / "o0"))
    no_labels = _probe_config(pretrain_data[0], workdir)
    no_labels.dataset, no_labels.test_split = "covid_notes", "test"
    with pytest.raises(ValueError, match="covid_notes:1.0.0 has no labels"):
        evaluate.evaluate(no_labels, str(tmp_path / "o2"))
    bad_mode = _probe_config(data_dir, workdir)
    bad_mode.mode = "full"
    with pytest.raises(ValueError, match="'mode' = 'full'; allowed values: 'linear', 'finetune'"):
        evaluate.evaluate(bad_mode, str(tmp_path / "o3"))
    text = _probe_config(data_dir, "")
    text.features_from, text.mode, text.embeddings = "text_embeddings", "finetune", "x"
    with pytest.raises(ValueError, match="needs mode='linear'"):
        evaluate.evaluate(text, str(tmp_path / "o4"))


def _planted_text_embeddings(data_dir: str, out: str, drop: int = 0, hidden: int = 24) -> dict[str, np.ndarray]:
    """Stored-schema vectors for every NIH-sample study: a random linear image of its labels plus noise."""
    import json

    from mvlp_jax.data import built, embedding_shards

    builder, _, _ = built.open_builder(data_dir, "nih_sample")
    rows = {}
    for split in builder.info.splits:
        source = built.open_split(builder, split)
        for i in range(len(source)):
            rows[source[i]["study_id"].decode()] = (source[i]["labels"] == 1).astype(float)
    rng = np.random.default_rng(3)
    mix = rng.normal(size=(14, hidden))
    vectors = {s: y @ mix + 0.5 * rng.normal(size=hidden) for s, y in sorted(rows.items())[drop:]}
    records = [embedding_shards.encode(s, v, -v, "float32") for s, v in vectors.items()]
    os.makedirs(out, exist_ok=True)
    embedding_shards.write_shard(os.path.join(out, embedding_shards.SHARD_PATTERN.format(index=0, count=1)), records)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(
            {
                "schema_version": embedding_shards.SCHEMA_VERSION,
                "hidden_size": hidden,
                "poolings": ["mean", "last"],
                "num_records": len(records),
                "model": "planted",
            },
            f,
        )
    return vectors


def test_text_embeddings_are_probed_by_study_and_a_planted_signal_is_found(nih_and_workdir, tmp_path):
    data_dir, _ = nih_and_workdir
    vectors = _planted_text_embeddings(data_dir, str(tmp_path / "emb"))
    source, _, where = features.labelled_split(data_dir, "nih_sample", "valid")
    got = features.text_features(features.load_text_table(str(tmp_path / "emb"), "last"), source, where)
    want = np.stack([-vectors[source[i]["study_id"].decode()] for i in range(len(source))])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    config = _probe_config(data_dir, "")
    config.features_from, config.embeddings = "text_embeddings", str(tmp_path / "emb")
    row = evaluate.evaluate(config, str(tmp_path / "out"))["checkpoints"][0]
    assert row["name"] == "llm:emb/mean" and row["mauc"] > 0.85, row["mauc"]
    _planted_text_embeddings(data_dir, str(tmp_path / "partial"), drop=3)
    config.embeddings = str(tmp_path / "partial")
    with pytest.raises(ValueError, match="3 studies of nih_sample:1.0.0/train have no stored embedding"):
        evaluate.evaluate(config, str(tmp_path / "out2"))


def test_layer_wise_lr_decay_scales_each_layer_and_freezes_the_rest():
    import jax.numpy as jnp
    import optax

    from mvlp_jax.evaluation import finetune

    depth, decay, lr = 3, 0.5, 0.1
    block = {"attention": {"kernel": jnp.ones((2, 2))}}
    loop = {
        "encoder": {
            "embedding": {"conv": {"kernel": jnp.ones((2, 2))}},
            "cls": jnp.ones((1, 2)),
            "encoder": {**{f"block_{i:02d}": block for i in range(depth)}, "norm": {"scale": jnp.ones(2)}},
        },
        "pool": {"map": {"probe": jnp.ones(2)}},
        "masked_model": {"decoder": {"kernel": jnp.ones(2)}},
        "log_temperature": jnp.ones(()),
    }
    scales = finetune.layer_scales(loop, depth, decay)
    assert float(scales["encoder"]["embedding"]["conv"]["kernel"]) == decay**4 == float(scales["encoder"]["cls"])
    assert [float(scales["encoder"]["encoder"][f"block_{i:02d}"]["attention"]["kernel"]) for i in range(3)] == [
        decay**3,
        decay**2,
        decay,
    ]
    assert float(scales["encoder"]["encoder"]["norm"]["scale"]) == 1 == float(scales["pool"]["map"]["probe"])
    assert float(scales["masked_model"]["decoder"]["kernel"]) == 0 == float(scales["log_temperature"])
    tx = optax.chain(optax.adam(lr), finetune.scale_by_tree(scales))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, loop), tx.init(loop), loop)  # Adam's first step: -lr * sign
    assert np.allclose(updates["encoder"]["encoder"]["block_00"]["attention"]["kernel"], -lr * decay**3, rtol=1e-4)
    assert np.all(updates["masked_model"]["decoder"]["kernel"] == 0)
    stacked = {"encoder": {"encoder": {"blocks": {"attention": {"kernel": jnp.ones((depth, 2, 2))}}}}}
    scan_scales = finetune.layer_scales(stacked, depth, decay)["encoder"]["encoder"]["blocks"]["attention"]["kernel"]
    assert np.allclose(np.broadcast_to(scan_scales, (depth, 2, 2))[:, 0, 0], [decay**3, decay**2, decay])


def test_finetune_mode_trains_the_encoder_and_reports_a_row(nih_and_workdir, tmp_path, monkeypatch):
    from mvlp_jax.evaluation import finetune

    data_dir, workdir = nih_and_workdir
    config = _probe_config(data_dir, workdir)
    config.mode, config.finetune.epochs, config.finetune.batch_size, config.finetune.lr = "finetune", 2, 64, 2e-3
    seen = {}
    fit = finetune.fit
    monkeypatch.setattr(
        finetune, "fit", lambda encoder, *a, **k: seen.setdefault("out", (encoder, fit(encoder, *a, **k)))[1]
    )
    row = evaluate.evaluate(config, str(tmp_path))["checkpoints"][0]
    assert row["mode"] == "finetune" and row["probe"]["epoch"] in (1, 2) and 0 <= row["mauc"] <= 1
    encoder, tuned = seen["out"]
    before, after = encoder.params, tuned.params["model"]
    moved = lambda tree_a, tree_b: max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b))
    )
    assert moved(before["encoder"]["embedding"], after["encoder"]["embedding"]) > 0  # the encoder itself learned
    assert moved(before["masked_model"], after["masked_model"]) == 0  # the MAE decoder is frozen


def test_the_feature_cache_never_serves_another_checkpoints_features(nih_and_workdir, pretrain_data, tmp_path):
    """Two runs both named `pretrain` at the same step, evaluated into one output dir, get their own features."""
    data_dir, workdir = nih_and_workdir
    other = str(tmp_path / "b" / "pretrain")
    train.train(micro_config(pretrain_data[0], pretrain_data[1], total_steps=4, seed=7), other)
    source, _, where = features.labelled_split(data_dir, "nih_sample", "valid")
    fingerprint = features.split_fingerprint(data_dir, "nih_sample", "valid")
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(-1, 1, 1), sharding.AXES)
    cache = str(tmp_path / "features")
    first, second = (encoder_lib.load(w, -1, mesh) for w in (workdir, other))
    assert (first.name, first.step) == (second.name, second.step) and first.fingerprint != second.fingerprint
    got_first = features.extract(first, source, "map", 32, mesh, cache, where, fingerprint)
    got_second = features.extract(second, source, "map", 32, mesh, cache, where, fingerprint)
    assert np.abs(got_first - got_second).max() > 1e-3  # not the cached features of the first run
    fresh = features.extract(second, source, "map", 32, mesh, str(tmp_path / "fresh"), where, fingerprint)
    np.testing.assert_array_equal(got_second, fresh)
    # the same checkpoint on another split (or a rebuilt one) is another cache entry too
    other_split = features.split_fingerprint(data_dir, "nih_sample", "train")
    assert other_split != fingerprint
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 2


def test_labels_without_positives_in_the_training_subset_are_skipped_and_named(nih_and_workdir, tmp_path):
    data_dir, workdir = nih_and_workdir
    config = _probe_config(data_dir, "random_init")
    config.random_init_like, config.label_fractions = workdir, (0.03,)
    config.seeds = 1  # one head: its mAUC is the mean of the labels it scored
    row = evaluate.evaluate(config, str(tmp_path))["checkpoints"][0]
    skipped = row["labels_skipped"]
    assert skipped and row["train_cases"] < 40, row["train_cases"]
    for name in skipped:
        assert np.isnan(row["auc"][name])  # not a constant-bias probe's AUC of 0.5
    scored = [n for n in row["auc"] if n not in skipped]
    assert scored and all(np.isfinite(row["auc"][n]) for n in scored)
    assert abs(row["mauc"] - np.mean([row["auc"][n] for n in scored])) < 1e-12
    table = open(tmp_path / "results.md").read()
    assert f"| 3% ({row['train_cases']} cases) |" in table
    assert "Not trained or scored at 3% of the labels" in table and next(iter(skipped)) in table
    config.label_fractions = (0.001,)  # one patient: no label has both classes
    with pytest.raises(ValueError, match=r"label fraction 0.001 keeps \d+ training cases of 1 patients, and no label"):
        evaluate.evaluate(config, str(tmp_path / "tiny"))


def test_a_cpu_evaluation_never_loads_libtpu(nih_and_workdir, tmp_path):
    """With the TPU compiler installed (make installs it for mvlp_jax.aot), a CPU run says nothing of TPUs: libtpu's
    failed start-up printed errors and advice to delete its lockfile into every run."""
    import subprocess
    import sys

    from tests.conftest import REPO

    data_dir, workdir = nih_and_workdir
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "ALLOW_MULTIPLE_LIBTPU_LOAD")}
    probe = os.path.join(REPO, "configs", "linear_probe.py") + ":nih_sample"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mvlp_jax.evaluate",
            f"--config={probe}",
            f"--config.workdirs={workdir}",
            f"--config.data_dir={data_dir}",
            "--config.bootstrap=20",
            f"--output_dir={tmp_path}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    output = (run.stdout + run.stderr).lower()
    assert "tpu" not in output, [line for line in output.splitlines() if "tpu" in line][:5]
    assert "| pretrain | 4 |" in open(tmp_path / "results.md").read()


def test_the_interval_of_several_seeds_holds_the_spread_between_them():
    """Two heads of one encoder that disagree (seed A scores 0.2 on every resample, seed B 0.8): the interval
    spans both, the mean is between them; one seed alone gives its own narrow interval."""
    groups = np.repeat(np.arange(50), 2)
    a, b = (lambda i: 0.2), (lambda i: 0.8)
    both = statistics.estimate([a, b], groups, 400, 0)
    assert both["mean"] == pytest.approx(0.5) and both["seeds"] == [0.2, 0.8] and both["spread"] == [0.2, 0.8]
    assert both["ci95"] == [0.2, 0.8]
    assert statistics.estimate([a], groups, 400, 0) == {"mean": 0.2, "ci95": [0.2, 0.2]}
    assert statistics.seeds_for(0, 0.1, 5000, head_is_random=False) == statistics.SEEDS_WHEN_SMALL
    assert statistics.seeds_for(0, 1.0, 100, head_is_random=False) == 1  # a probe on all labels: deterministic
    assert statistics.seeds_for(0, 1.0, 100, head_is_random=True) == statistics.SEEDS_WHEN_SMALL
    assert statistics.seeds_for(0, 1.0, 5000, head_is_random=True) == 1
    assert statistics.seeds_for(5, 1.0, 5000, head_is_random=True) == 5


def test_probes_on_a_tenth_of_the_labels_train_three_seeds_and_the_interval_covers_each(nih_and_workdir, tmp_path):
    data_dir, workdir = nih_and_workdir
    config = _probe_config(data_dir, workdir)
    config.label_fractions, config.bootstrap = (0.1,), 200
    (row,) = evaluate.evaluate(config, str(tmp_path / "auto"))["checkpoints"]
    seeds = row["seeds"]
    assert seeds["count"] == 3 and seeds["first"] == 0 and len(set(seeds["mauc"])) == 3  # other subsets, other heads
    assert len(set(seeds["train_cases"])) > 1 or len(set(seeds["mauc"])) == 3
    assert row["mauc"] == pytest.approx(np.mean(seeds["mauc"]))
    lo, hi = row["ci95"]["mauc"]
    assert all(lo <= value <= hi for value in seeds["mauc"]), (lo, hi, seeds["mauc"])
    assert "(3 seeds: " in open(tmp_path / "auto" / "results.md").read()
    config.seeds = 1
    (single,) = evaluate.evaluate(config, str(tmp_path / "one"))["checkpoints"]
    assert single["seeds"]["count"] == 1 and single["mauc"] == pytest.approx(seeds["mauc"][0])


def test_comparisons_are_keyed_by_the_run_not_its_folder_name(nih_and_workdir, contrastive_run, tmp_path):
    """X/A/run, X/mae, X/B/run: two runs share the folder name 'run'. Each row keeps its own label, and each
    comparison is against the first run listed, computed from its own probes."""
    import shutil

    data_dir, workdir = nih_and_workdir
    runs = [tmp_path / "X" / "A" / "run", tmp_path / "X" / "mae", tmp_path / "X" / "B" / "run"]
    for target, source in zip(runs, (workdir, workdir, contrastive_run)):
        shutil.copytree(source, target)
    config = _probe_config(data_dir, ",".join(map(str, runs)))
    config.label_fractions, config.bootstrap = (1.0,), 50
    results = evaluate.evaluate(config, str(tmp_path / "out"))
    rows = {r["name"]: r for r in results["checkpoints"]}
    assert list(rows) == ["A/run", "mae", "B/run"] and rows["B/run"]["workdir"] == str(runs[2])
    comparisons = {c["candidate"]: c for c in results["comparisons"]}
    assert set(comparisons) == {"mae", "B/run"} and {c["baseline"] for c in comparisons.values()} == {"A/run"}
    for name in ("mae", "B/run"):  # one seed: the difference is the rows' difference
        assert comparisons[name]["mauc_difference"] == pytest.approx(rows[name]["mauc"] - rows["A/run"]["mauc"])
    assert comparisons["mae"]["mauc_difference"] == pytest.approx(0.0)  # a copy of A/run
    assert comparisons["B/run"]["mauc_difference"] != pytest.approx(0.0)
    assert "B/run vs A/run (100% labels)" in open(tmp_path / "out" / "results.md").read()


def test_a_test_split_too_small_to_estimate_anything_is_refused_with_its_counts(tmp_path):
    """One test image: an interval of [1.000, 1.000] and an mAUC of nan once came out with exit 0."""
    import csv

    from data_prep.build_dataset import build
    from mvlp_jax.tools.demo import DATASETS
    from tests.conftest import SAMPLE

    rows = list(csv.DictReader(open(os.path.join(SAMPLE, "nih14", "manifest.csv"))))
    kept = [r for r in rows if r["split"] == "train"][:120] + [r for r in rows if r["split"] == "valid"][:1]
    for r in kept:  # absolute: the manifest is written elsewhere than the images
        r["image"] = os.path.join(SAMPLE, "nih14", r["image"])
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    options = dict(DATASETS["nih_sample"], image_size=32)
    options.pop("input_dir")
    images = os.path.join(SAMPLE, "nih14")
    build("csv", images, str(tmp_path / "tfds"), name="tiny", manifest=str(tmp_path / "manifest.csv"), **options)
    config = _probe_config(str(tmp_path / "tfds"), "random_init")
    config.dataset = "tiny"
    with pytest.raises(
        ValueError,
        match=r"tiny:1.0.0/valid has 1 test cases of 1 patients: too few to estimate a "
        r"metric and its interval \(at least 10 cases of 5 patients\)",
    ):
        evaluate.evaluate(config, str(tmp_path / "out"))
    assert statistics.percentile_interval([1.0] + [float("nan")] * 3) != statistics.percentile_interval([1.0] * 4)
