"""Test setup: JAX on CPU with 8 simulated devices, set before jax is imported anywhere."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
SAMPLE = os.path.join(REPO, "data_prep", "sample")
if REPO not in sys.path:
    sys.path.insert(0, REPO)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory):
    """(data_dir, embeddings_dir, all study ids): the real covid sample at 64 px with stand-in targets."""
    from tests.pretrain_setup import build_sample, write_targets

    root = str(tmp_path_factory.mktemp("pretrain"))
    data_dir = build_sample(root)
    studies = write_targets(data_dir, os.path.join(root, "emb"))
    return data_dir, os.path.join(root, "emb"), studies


@pytest.fixture(scope="session")
def contrastive_run(pretrain_data, tmp_path_factory):
    """A workdir of the micro ViT trained 2 steps with llm_contrastive alone on the shipped sample (export and
    retrieval tests read it)."""
    from mvlp_jax.pretrain import train
    from tests.pretrain_setup import micro_config

    data_dir, emb, _ = pretrain_data
    workdir = str(tmp_path_factory.mktemp("contrastive_run"))
    train.train(micro_config(data_dir, emb, objectives={"llm_contrastive": 1.0}, total_steps=2), workdir)
    return workdir


@pytest.fixture(scope="session")
def nih_and_workdir(pretrain_data, tmp_path_factory):
    """The shipped real NIH sample at 64 px, and a micro pretraining workdir (LLM contrastive + MAE)."""
    from data_prep.build_dataset import build
    from mvlp_jax.pretrain import train
    from mvlp_jax.tools.demo import DATASETS
    from tests.pretrain_setup import micro_config

    root = tmp_path_factory.mktemp("eval")
    options = dict(DATASETS["nih_sample"], image_size=64)
    build("csv", options.pop("input_dir"), str(root / "tfds"), name="nih_sample", **options)
    data_dir, emb_dir, _ = pretrain_data
    workdir = str(root / "pretrain")
    train.train(micro_config(data_dir, emb_dir, total_steps=4), workdir)
    return str(root / "tfds"), workdir
