"""Export to transformers: JAX -> HF -> JAX is exact, and the exported model loaded by transformers in PyTorch
gives the JAX encoder's tokens on real X-rays."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvlp_jax.data import transforms
from mvlp_jax.models.convert_hf import unstack_blocks, vit_params_from_hf, vit_params_to_hf
from mvlp_jax.models.vit import ViT
from mvlp_jax.pretrain import encoder as encoder_lib
from mvlp_jax.pretrain import train
from mvlp_jax.runtime import sharding
from mvlp_jax.tools import export
from tests.pretrain_setup import micro_config

TINY = dict(width=32, depth=3, num_heads=4, mlp_dim=64, patch_size=8)


@pytest.mark.parametrize("scan", [False, True])
def test_jax_to_hf_to_jax_is_exact(scan):
    params = nn.unbox(ViT(**TINY, scan=scan).init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"])
    params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), params)  # no zeros
    table = np.random.default_rng(0).normal(size=(1, 17, 32)).astype(np.float32)
    state = vit_params_to_hf(params, table)
    np.testing.assert_array_equal(state["embeddings.position_embeddings"], table)
    back = vit_params_from_hf(state, num_heads=4, depth=3, prefix="")
    want = {**params, "encoder": unstack_blocks(params["encoder"])}
    assert jax.tree.structure(back) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _real_images(data_dir: str, size: int, n: int = 6) -> np.ndarray:
    from mvlp_jax.data import built

    builder, _, _ = built.open_builder(data_dir, "covid_notes")
    source = built.open_split(builder, "test")
    return np.stack(
        [
            transforms.normalise(
                transforms.center_crop_resize(transforms.decode_png(source[i]["image"]), size), 0.5, 0.25
            )
            for i in range(n)
        ]
    )


@pytest.mark.parametrize("kind", ["ViTMAEModel", "ViTModel"])
def test_an_exported_run_loads_in_transformers_and_gives_the_jax_tokens(kind, pretrain_data, contrastive_run, tmp_path):
    import torch
    import transformers

    data_dir, emb, _ = pretrain_data
    workdir = contrastive_run  # llm_contrastive alone: a ViTModel
    if kind == "ViTMAEModel":  # with the masked autoencoder
        workdir = str(tmp_path / "run")
        train.train(
            micro_config(data_dir, emb, objectives={"llm_contrastive": 1.0, "mae": 1.0}, total_steps=2), workdir
        )
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
    encoder = encoder_lib.load(workdir, -1, mesh)
    card = export.export(encoder, str(tmp_path / "hf"))

    model = getattr(transformers, kind).from_pretrained(str(tmp_path / "hf")).eval()
    assert model.config.num_channels == 1 and model.config.image_size == 32
    images = _real_images(data_dir, 32)
    ours = np.asarray(
        encoder.model.apply({"params": encoder.params}, jnp.asarray(images), method=lambda m, x: m.encoder(x))
    )
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        in_order = torch.arange(16, dtype=torch.float32).expand(len(images), -1)  # ViTMAE shuffles tokens by noise
        extra = {"noise": in_order} if kind == "ViTMAEModel" else {}
        theirs = model(pixel_values=pixels, **extra).last_hidden_state.numpy()
    assert theirs.shape == ours.shape == (len(images), 17, 64)
    np.testing.assert_allclose(theirs, ours, atol=1e-4)

    from safetensors.numpy import load_file

    heads = load_file(str(tmp_path / "hf" / "heads.safetensors"))
    np.testing.assert_array_equal(heads["pool/map/probe"], np.asarray(encoder.params["pool"]["map"]["probe"]))
    processor = json.load(open(tmp_path / "hf" / "preprocessor_config.json"))
    assert processor["image_mean"] == [0.5] and processor["image_std"] == [0.25]
    text = open(card).read()
    assert (
        f"transformers `{kind}`" in text
        and "covid_notes" in text
        and os.path.exists(tmp_path / "hf" / "training_config.json")
    )


def test_export_refuses_a_folder_of_other_files_but_redoes_its_own(contrastive_run, tmp_path):
    """An export never writes its README.md and config.json beside someone else's files without --overwrite; an
    earlier export of the same run is replaced, leaving none of its stale files."""
    import subprocess
    import sys

    from tests.conftest import REPO

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    (folder / "config.json").write_text("{}")
    command = [sys.executable, "-m", "mvlp_jax.export", f"--workdir={contrastive_run}", f"--output_dir={folder}"]
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert (
        refused.returncode == 2
        and "holds 2 files (README.md, config.json), not an export of this run" in " ".join(refused.stderr.split())
        and "--overwrite" in refused.stderr
    )
    assert (folder / "README.md").read_text() == "my notes"
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
    encoder = encoder_lib.load(contrastive_run, -1, mesh)
    mine = tmp_path / "mine"
    export.export(encoder, str(mine), workdir=contrastive_run)
    (mine / "stale.safetensors").write_text("")  # as if an earlier export had written it
    marker = json.load(open(mine / export.MARKER))
    json.dump({**marker, "files": marker["files"] + ["stale.safetensors"]}, open(mine / export.MARKER, "w"))
    export.check_output_dir(str(mine), contrastive_run, overwrite=False)  # its own earlier export: fine
    export.export(encoder, str(mine), workdir=contrastive_run)
    assert not (mine / "stale.safetensors").exists() and (mine / "model.safetensors").exists()
    with pytest.raises(Exception, match="an export of another run"):
        export.check_output_dir(str(mine), str(tmp_path / "other_run"), overwrite=False)
    overwritten = subprocess.run(command + ["--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert overwritten.returncode == 0, overwritten.stderr[-2000:]
    assert "mvlp_jax" in (folder / "README.md").read_text()


def test_the_model_card_carries_the_hubs_metadata_read_by_the_hubs_own_parser(contrastive_run, tmp_path):
    from huggingface_hub import ModelCard

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
    encoder = encoder_lib.load(contrastive_run, -1, mesh)
    results = tmp_path / "results.json"
    row = {
        "workdir": contrastive_run,
        "step": encoder.step,
        "mode": "linear",
        "label_fraction": 1.0,
        "train_cases": 10,
        "test_cases": 5,
        "mauc": 0.61,
        "ci95": {"mauc": [0.5, 0.7]},
        "accuracy": 0.4,
    }
    results.write_text(json.dumps({"checkpoints": [row], "notes": []}))
    card = ModelCard.load(export.export(encoder, str(tmp_path / "hf"), str(results), workdir=contrastive_run))
    data = card.data.to_dict()
    assert data["license"] == "other" and data["license_name"] == "per-image-licences"  # the sample's per-image terms
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-feature-extraction"
    assert data["datasets"] == ["covid_notes"] and data["metrics"] == ["roc_auc"]
    assert {"mvlp_jax", "vit", "llm_contrastive", "medical-imaging"} <= set(data["tags"])
    assert "base_model" not in data  # trained from scratch
    assert "mAUC 0.6100 [95% CI 0.5000, 0.7000]" in card.text
