"""Local report-word / image-region alignment: the similarity and loss against a direct NumPy computation, padding
tokens that change nothing, embeddings without token states refused by name, and training on the shipped sample
that lowers the loss and draws the word -> region picture."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvlp_jax import configuration
from mvlp_jax.data import pipeline
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.objectives import local_alignment
from mvlp_jax.objectives.contrastive_losses import symmetric_cross_entropy
from mvlp_jax.pretrain import train
from tests.pretrain_setup import HIDDEN, build_sample, micro_config, write_targets


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_similarities(words, mask, regions, word_temp, aggregate_temp):
    """S[i, j] by the formula, one report word at a time, in float64."""
    out = np.zeros((len(words), len(regions)))
    for i in range(len(words)):
        for j in range(len(regions)):
            scores = []
            for t in np.flatnonzero(mask[i]):
                cos = _unit(regions[j]) @ _unit(words[i, t])
                attention = np.exp(word_temp * cos) / np.exp(word_temp * cos).sum()
                context = attention @ regions[j]
                scores.append(aggregate_temp * (_unit(words[i, t]) @ _unit(context)))
            out[i, j] = np.log(np.sum(np.exp(scores))) / aggregate_temp
    return out


def test_similarity_and_loss_match_numpy_and_padding_changes_nothing():
    rng = np.random.default_rng(0)
    words, regions = rng.normal(size=(3, 5, 8)), rng.normal(size=(3, 6, 8))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    want = _numpy_similarities(words, mask, regions, 4.0, 5.0)
    got = local_alignment.similarities(
        jnp.asarray(words, jnp.float32), jnp.asarray(mask), jnp.asarray(regions, jnp.float32), 4.0, 5.0
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    logits = 10.0 * want
    log_softmax = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))
    loss = -0.5 * (np.trace(log_softmax(logits)) + np.trace(log_softmax(logits.T))) / 3
    np.testing.assert_allclose(symmetric_cross_entropy(jnp.asarray(logits, jnp.float32)), loss, rtol=1e-5)
    garbage = np.where(mask[..., None], words, 1e3 * rng.normal(size=words.shape))
    again = local_alignment.similarities(
        jnp.asarray(garbage, jnp.float32), jnp.asarray(mask), jnp.asarray(regions, jnp.float32), 4.0, 5.0
    )
    np.testing.assert_array_equal(again, got)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("local_alignment"))
    data_dir = build_sample(root, image_size=64)
    with_tokens, without = os.path.join(root, "emb_tokens"), os.path.join(root, "emb")
    write_targets(data_dir, with_tokens, tokens=True)
    write_targets(data_dir, without)
    return data_dir, with_tokens, without


def _config(data_dir, embeddings_dir, **overrides):
    c = micro_config(data_dir, embeddings_dir, objectives={"local_alignment": 1.0, "llm_contrastive": 1.0}, **overrides)
    c.local_alignment.max_tokens, c.local_alignment.embed_dim = 8, 32
    configuration.validate(c)
    return c


def test_padding_tokens_change_nothing_through_the_model(sample):
    data_dir, with_tokens, _ = sample
    config = _config(data_dir, with_tokens)
    records = pipeline.open_records(config)
    example = records.tokens.example(int(records.target_rows[0]))
    assert example["report_tokens"].shape == (8, HIDDEN) and example["report_tokens"].dtype == np.float16
    n = int(example["report_token_mask"].sum())
    assert 3 <= n <= 8 and not example["report_token_mask"][n:].any() and not example["report_tokens"][n:].any()
    rng = np.random.default_rng(1)
    batch = {
        "image": rng.normal(size=(4, 32, 32, 1)).astype(np.float32),
        "target": rng.normal(size=(4, HIDDEN)).astype(np.float32),
        "report_tokens": rng.normal(size=(4, 8, HIDDEN)).astype(np.float16),
        "report_token_mask": np.arange(8)[None] < np.array([[3], [8], [5], [1]]),
    }
    model = Pretrainer(config, HIDDEN)
    params = model.init(jax.random.PRNGKey(0), batch["image"], batch["target"], method=Pretrainer.init_all)["params"]
    loss_fn = local_alignment.make(model, config)
    loss = loss_fn(params, batch, jax.random.PRNGKey(0), {})[0]
    padded = dict(
        batch,
        report_tokens=np.where(batch["report_token_mask"][..., None], batch["report_tokens"], 50.0).astype(np.float16),
    )
    np.testing.assert_allclose(loss_fn(params, padded, jax.random.PRNGKey(0), {})[0], loss, rtol=1e-6)
    no_real = dict(batch, report_token_mask=batch["report_token_mask"] & (np.arange(8)[None] < 1))
    assert abs(float(loss_fn(params, no_real, jax.random.PRNGKey(0), {})[0]) - float(loss)) > 1e-4  # real ones count


def test_embeddings_without_token_states_are_refused_by_name(sample):
    data_dir, _, without = sample
    with pytest.raises(ValueError, match="objectives local_alignment read per-token report states.*--store_tokens"):
        pipeline.open_records(_config(data_dir, without))


def test_training_on_the_sample_lowers_it_and_draws_words_on_regions(sample, tmp_path):
    data_dir, with_tokens, _ = sample
    config = _config(data_dir, with_tokens, total_steps=16, **{"checkpoint.save_interval_steps": 16})
    config.log_images_every_steps = 16
    train.train(config, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["local_alignment/loss"] for r in rows]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    pictures = os.listdir(tmp_path / "plots")
    assert any(p.startswith("local_alignment") for p in pictures), pictures
