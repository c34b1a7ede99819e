"""A run is bound to the data and targets it trained on (WORKDIR/inputs.json): a resume on re-embedded targets,
training on embeddings made before the dataset was rebuilt, and retrieval against changed or other-layer vectors
are refused by name; the override trains or evaluates and every result then says so."""

import json
import os
import shutil

import pytest

from mvlp_jax.data import built
from mvlp_jax.evaluation import evaluate
from mvlp_jax.pretrain import train
from mvlp_jax.runtime import run_inputs
from tests.pretrain_setup import micro_config, write_targets


@pytest.fixture
def run_and_targets(pretrain_data, tmp_path):
    """A 2-step LLM-contrastive run on its own copy of the stand-in targets."""
    data_dir, emb_dir, _ = pretrain_data
    emb = str(tmp_path / "emb")
    shutil.copytree(emb_dir, emb)
    workdir = str(tmp_path / "run")
    train.train(micro_config(data_dir, emb, objectives={"llm_contrastive": 1.0}, total_steps=2), workdir)
    return data_dir, emb, workdir


def _retrieval(data_dir: str, workdir: str, **overrides):
    from configs import linear_probe

    c = linear_probe.get_config()
    c.evaluator, c.workdirs, c.data_dir, c.dataset, c.test_split = "retrieval", workdir, data_dir, "covid_notes", "test"
    c.bootstrap, c.batch_size = 20, 16
    for key, value in overrides.items():
        c[key] = value
    return c


def test_a_resume_and_retrieval_on_re_embedded_targets_are_refused_then_allowed_and_noted(run_and_targets, tmp_path):
    data_dir, emb, workdir = run_and_targets
    recorded = json.load(open(os.path.join(workdir, run_inputs.FILE)))
    assert recorded["data"]["dataset"] == "covid_notes:1.0.0" and recorded["data"]["splits"]["train"]["examples"] == 178
    write_targets(data_dir, emb, seed=1)  # the same studies and width, other vectors: rebuilt in place
    config = micro_config(data_dir, emb, objectives={"llm_contrastive": 1.0}, total_steps=4)
    with pytest.raises(
        ValueError,
        match=r"trained on other inputs than it would resume on: LLM embeddings changed "
        r"\(the same settings, other vectors",
    ):
        train.train(config, workdir)
    with pytest.raises(
        ValueError,
        match=r"retrieval reads .*/emb as .*/run's the targets it trained on, but they "
        r"changed since",
    ):
        evaluate.evaluate(_retrieval(data_dir, workdir), str(tmp_path / "r1"))
    noted = evaluate.evaluate(_retrieval(data_dir, workdir, allow_changed_inputs=True), str(tmp_path / "r2"))
    assert "retrieval against changed embeddings (allow_changed_inputs)" in noted["notes"][0]
    assert "Note: " in open(tmp_path / "r2" / "results.md").read()

    config.data.allow_changed_inputs = True
    assert train.train(config, workdir).last_step == 4
    history = json.load(open(os.path.join(workdir, "config_changes.json")))
    assert history[-1]["resumed_at_step"] == 2 and "LLM embeddings changed" in history[-1]["inputs"][0]
    probe = _retrieval(data_dir, workdir, allow_changed_inputs=True)
    assert any(
        "resumed at step 2 on changed inputs (data.allow_changed_inputs)" in n
        for n in evaluate.evaluate(probe, str(tmp_path / "r3"))["notes"]
    )


def test_other_layer_embeddings_and_a_rebuilt_dataset_are_refused(run_and_targets, tmp_path):
    data_dir, emb, workdir = run_and_targets
    other = str(tmp_path / "layer7")
    shutil.copytree(emb, other)
    manifest = json.load(open(os.path.join(other, "manifest.json")))
    json.dump({**manifest, "layer": 7}, open(os.path.join(other, "manifest.json"), "w"))
    with pytest.raises(
        ValueError,
        match=r"report vectors, but not of the model and layer it trained on \(layer 7, "
        r"the run's None\)",
    ):
        evaluate.evaluate(_retrieval(data_dir, workdir, embeddings=other), str(tmp_path / "r"))
    # embeddings made from the dataset as it was before a rebuild that moved a record out of train
    builder = built.open_builder(data_dir, "covid_notes")[0]
    then = built.fingerprint(builder)
    then["splits"]["train"]["examples"] = 179
    then["sha256"] = "0" * 64
    json.dump({**manifest, "source_fingerprint": then}, open(os.path.join(emb, "manifest.json"), "w"))
    with pytest.raises(
        ValueError,
        match=r"covid_notes:1.0.0 was rebuilt since .* embedded its reports \(train 179 -> "
        r"178 records\)",
    ):
        train.train(
            micro_config(data_dir, emb, objectives={"llm_contrastive": 1.0}, total_steps=2), str(tmp_path / "fresh")
        )
