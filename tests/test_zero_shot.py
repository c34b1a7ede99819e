"""Zero-shot classification: with planted prompt vectors the binary's scores equal a direct computation from the
run's own embedding methods (AUC against sklearn), swapping a label's prompt sets gives 1 - AUC, and an LLM
other than the targets' is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mvlp_jax.evaluation import zero_shot, zero_shot_prompts
from mvlp_jax.objectives import llm_contrastive
from mvlp_jax.pretrain import encoder as encoder_lib
from mvlp_jax.runtime import sharding
from tests.test_evaluate import _probe_config


def _planted(texts: list[str]) -> np.ndarray:
    """A fixed random vector per prompt text (hidden size 24, as the stand-in targets)."""
    return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=24) for t in texts]).astype(np.float32)


def _config(data_dir, workdir, prompts="pair"):
    c = _probe_config(data_dir, workdir)
    c.evaluator, c.prompts, c.bootstrap = "zero_shot", prompts, 50
    return c


@pytest.mark.parametrize("style", ["pair", "ensemble"])
def test_zero_shot_scores_equal_a_direct_computation(style, nih_and_workdir, tmp_path, monkeypatch):
    from mvlp_jax.data import built, transforms
    from mvlp_jax.evaluation import evaluate

    data_dir, workdir = nih_and_workdir
    monkeypatch.setattr(zero_shot, "llm_embedder", lambda manifest, pooling, llm: _planted)
    (row,) = evaluate.evaluate(_config(data_dir, workdir, style), str(tmp_path))["zero_shot"]

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
    encoder = encoder_lib.load(workdir, -1, mesh)
    builder, _, _ = built.open_builder(data_dir, "nih_sample")
    source = built.open_split(builder, "valid")
    records = [source[i] for i in range(len(source))]
    size = encoder.config.model.image_size
    images = np.stack(
        [
            transforms.normalise(transforms.center_crop_resize(transforms.decode_png(r["image"]), size), 0.5, 0.25)
            for r in records
        ]
    )
    apply = lambda x, method: np.asarray(encoder.model.apply({"params": encoder.params}, jnp.asarray(x), method=method))
    unit = lambda z: z / np.linalg.norm(z, axis=-1, keepdims=True)
    z_img = unit(apply(images, lambda m, x: llm_contrastive.embed_images(m, x, train=False)))
    labels = np.stack([r["labels"] for r in records])
    for j, name in enumerate(row["auc"]):
        positive, negative = zero_shot_prompts.prompts(name, style)
        mean_of = lambda texts: unit(unit(apply(_planted(list(texts)), llm_contrastive.embed_targets)).mean(0))
        margin = z_img @ mean_of(positive) - z_img @ mean_of(negative)
        keep = labels[:, j] != -1
        truth = labels[keep, j] == 1
        if truth.all() or not truth.any():
            assert not np.isfinite(row["auc"][name])
            continue
        # the binary's forward runs batch-sharded over 8 devices, this one on 1: float32 rounding may flip one
        # near-tied pair of cases, which moves the AUC by 1 / (positives x negatives)
        one_pair = 1 / (truth.sum() * (~truth).sum())
        np.testing.assert_allclose(row["auc"][name], roc_auc_score(truth, margin[keep]), atol=one_pair + 1e-9)


def test_swapped_prompt_sets_give_one_minus_the_auc(nih_and_workdir, tmp_path, monkeypatch):
    from mvlp_jax.evaluation import evaluate

    data_dir, workdir = nih_and_workdir
    monkeypatch.setattr(zero_shot, "llm_embedder", lambda manifest, pooling, llm: _planted)
    (row,) = evaluate.evaluate(_config(data_dir, workdir), str(tmp_path / "a"))["zero_shot"]
    real = zero_shot_prompts.prompts
    monkeypatch.setattr(zero_shot_prompts, "prompts", lambda label, style: real(label, style)[::-1])
    (swapped,) = evaluate.evaluate(_config(data_dir, workdir), str(tmp_path / "b"))["zero_shot"]
    for name, auc in row["auc"].items():
        if np.isfinite(auc):
            np.testing.assert_allclose(swapped["auc"][name], 1 - auc, atol=1e-6)
    assert "zero-shot, pair" in open(tmp_path / "a" / "results.md").read()


def test_another_llm_than_the_targets_is_refused():
    manifest = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)", "layer": -1, "weights_sha256": "0" * 64}
    with pytest.raises(ValueError, match="is not the LLM the run's targets came from"):
        zero_shot.llm_embedder(manifest, "mean", "")
    with pytest.raises(ValueError, match="pass that model as --config.llm"):
        zero_shot.llm_embedder({**manifest, "model": "Llama-2-7b-hf"}, "mean", "")
