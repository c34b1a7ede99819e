"""Evaluators describe themselves: one defined here runs through the evaluation binary on real checkpoints with no
project file edited (its config rows, its rule, the common per-checkpoint loop), and the binary refuses an
evaluator nobody registered."""

import json
import os

import numpy as np
import pytest

from mvlp_jax.evaluation import common, evaluate, features, registry, report
from mvlp_jax.runtime import schema
from tests.conftest import REPO


def _mean_feature_norm(config, output_dir, mesh) -> dict:
    """A toy evaluator: per checkpoint, the mean L2 norm of its pooled features on the test split."""
    source, _, where = features.labelled_split(config.data_dir, config.dataset, config.test_split)
    rows = []
    for subject, encoder in common.encoders(config, mesh):
        x = features.extract(
            encoder, source, "mean", config.batch_size, mesh, os.path.join(output_dir, "cache"), where, ""
        )
        rows.append(
            {
                "workdir": subject,
                "name": encoder.name,
                "step": encoder.step,
                "norm": float(np.linalg.norm(x, axis=1).mean()) * config.feature_norm.scale,
            }
        )
    results = {"config": config.to_dict(), "feature_norm": rows}
    report.save(output_dir, results, "\n".join(f"| {r['name']} | {r['norm']:.4f} |" for r in rows))
    return results


TOY = common.Evaluator(
    name="feature_norm",
    run=_mean_feature_norm,
    description="the mean norm of the pooled features (a test's toy)",
    config_rows={"feature_norm.scale": (1.0, schema.POSITIVE, "Feature norm: a factor on the reported norm.")},
    rules=((lambda c: c.evaluator != "feature_norm" or c.features_from == "image", "feature_norm reads images"),),
)


@pytest.fixture
def toy_evaluator():
    registry.register(TOY)
    yield TOY
    del registry.EVALUATORS[TOY.name]


def _config(data_dir: str, workdirs: str):
    c = schema.load_file(os.path.join(REPO, "configs", "linear_probe.py"), "nih_sample")
    c.data_dir, c.workdirs, c.bootstrap, c.batch_size = data_dir, workdirs, 100, 32
    return c


def test_an_evaluator_defined_in_a_test_runs_through_the_binary_on_every_checkpoint(
    nih_and_workdir, tmp_path, toy_evaluator
):
    data_dir, workdir = nih_and_workdir
    assert "feature_norm.scale" in registry.table() and "feature_norm" in registry.table()["evaluator"][2]
    config = registry.defaults()  # the defaults now hold the toy's rows
    assert config.feature_norm.scale == 1.0
    config = _config(data_dir, f"random_init,{workdir}")
    config.unlock()
    config.evaluator, config.feature_norm = "feature_norm", {"scale": 2.0}
    results = evaluate.evaluate(config, str(tmp_path))
    assert [r["name"] for r in results["feature_norm"]] == ["random_init", "pretrain"]
    assert [r["workdir"] for r in results["feature_norm"]] == ["random_init", workdir]
    assert all(r["norm"] > 0 for r in results["feature_norm"])
    assert json.load(open(tmp_path / "results.json"))["feature_norm"] == results["feature_norm"]
    assert "| pretrain |" in open(tmp_path / "results.md").read()
    config.feature_norm.scale = -1.0
    with pytest.raises(ValueError, match="'feature_norm.scale' = -1.0 must be > 0"):
        evaluate.evaluate(config, str(tmp_path / "again"))
    config.feature_norm.scale, config.features_from = 1.0, "text_embeddings"
    with pytest.raises(ValueError, match="feature_norm reads images"):
        evaluate.evaluate(config, str(tmp_path / "again"))


def test_an_evaluator_nobody_registered_is_refused_with_the_registered_ones(tmp_path):
    config = _config(str(tmp_path), "random_init")
    config.unlock()
    config.evaluator = "feature_norm"
    with pytest.raises(
        ValueError,
        match="'evaluator' = 'feature_norm' must be one of classification, retrieval, "
        "zero_shot, segmentation, detection",
    ):
        evaluate.evaluate(config, str(tmp_path / "out"))


def test_an_evaluator_cannot_take_a_key_another_one_owns(toy_evaluator):
    registry.register(
        common.Evaluator(
            name="clash", run=_mean_feature_norm, description="", config_rows={"feature_norm.scale": (1.0, None, "")}
        )
    )
    try:
        with pytest.raises(ValueError, match="evaluator 'clash' declares config keys already taken"):
            registry.table()
    finally:
        del registry.EVALUATORS["clash"]


def test_an_older_configs_task_or_mode_is_named_with_the_evaluator_it_is_now(tmp_path):
    config = _config(str(tmp_path), "random_init")
    config.unlock()
    config.mode = "retrieval"
    with pytest.raises(ValueError, match="config.mode='retrieval' is now config.evaluator='retrieval'"):
        evaluate.evaluate(config, str(tmp_path / "out"))
    config.mode, config.evaluator = "finetune", "zero_shot"
    with pytest.raises(ValueError, match="trains no head and tunes no encoder"):
        evaluate.evaluate(config, str(tmp_path / "out"))
