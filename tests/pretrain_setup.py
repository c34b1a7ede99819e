"""Shared set-up of the pretraining tests: the shipped real COVID sample built small, stand-in LLM
targets written in the real embedding schema, and a micro config that compiles in seconds."""

from __future__ import annotations

import json
import os

import numpy as np

from mvlp_jax.data import embedding_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # not from conftest: it sets XLA_FLAGS,
# and config files written by `write_config_file` import this module inside the binary under test

HIDDEN = 24


def build_sample(root: str, image_size: int = 64) -> str:
    """The shipped covid_notes sample as a TFDS dataset (shorter side `image_size`); returns the data dir."""
    from data_prep.build_dataset import build
    from mvlp_jax.tools.demo import DATASETS

    options = dict(DATASETS["covid_notes"], image_size=image_size)
    input_dir = options.pop("input_dir")
    build("csv", input_dir, os.path.join(root, "tfds"), name="covid_notes", **options)
    return os.path.join(root, "tfds")


def write_targets(
    data_dir: str,
    out: str,
    drop: tuple[str, ...] = (),
    hidden: int = HIDDEN,
    source: dict | None = None,
    dataset: str = "covid_notes",
    seed: int = 0,
    tokens: bool = False,
) -> list[str]:
    """One random `mean`/`last` record per study of every split (minus `drop`, vectors drawn with `seed`), in the
    stored schema; the manifest names the dataset as its source (or `source`). `tokens`: also 3-12 random
    per-token states per study, with words, as --store_tokens writes them."""
    from mvlp_jax.data import built

    builder, _, _ = built.open_builder(data_dir, dataset)
    studies = sorted(
        {
            built.open_split(builder, s)[i]["study_id"].decode()
            for s in builder.info.splits
            for i in range(len(built.open_split(builder, s)))
        }
    )
    kept = [s for s in studies if s not in drop]
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    records = []
    for s in kept:
        mean, last = rng.normal(size=hidden), rng.normal(size=hidden)
        states = rng.normal(size=(rng.integers(3, 13), hidden)) if tokens else None
        words = [f" w{i}" for i in range(len(states))] if tokens else None
        records.append(embedding_shards.encode(s, mean, last, "float32", states, words))
    embedding_shards.write_shard(os.path.join(out, embedding_shards.SHARD_PATTERN.format(index=0, count=1)), records)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(
            {
                "schema_version": embedding_shards.SCHEMA_VERSION,
                "hidden_size": hidden,
                "poolings": ["mean", "last"] + (["tokens"] if tokens else []),
                "num_records": len(kept),
                "model": "random-test-targets",
                "source": source
                or {"kind": "dataset", "name": dataset, "version": "1.0.0", "splits": list(builder.info.splits)},
            },
            f,
        )
    return studies


def micro_config(data_dir: str, embeddings_dir: str, **overrides):
    """configs/pretrain.py:demo shrunk to a 2-layer width-64 ViT at 32 px, batch 16."""
    from configs import pretrain

    c = pretrain.get_config("demo")
    c.data.data_dir, c.data.embeddings_dir = data_dir, embeddings_dir
    c.model.variant, c.model.image_size = "mu/8", 32
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads, c.model.pool_heads = 32, 1, 2, 2
    c.data.batch_size, c.data.num_threads = 16, 2
    c.total_steps, c.optim.warmup_steps, c.log_every_steps = 6, 2, 1
    c.checkpoint.save_interval_steps = 2
    c.log_images_every_steps = 0  # the demo's pictures cost seconds per run: tests/test_visualize.py draws them
    c.peak_flops_per_device = 1e11
    from mvlp_jax import configuration

    return configuration.override(c, overrides)


def write_config_file(path: str, data_dir: str, embeddings_dir: str, **overrides) -> str:
    """A config file for the binary whose get_config() is `micro_config(...)` (for subprocess runs)."""
    with open(path, "w") as f:
        f.write(
            f"import sys\nsys.path.insert(0, {REPO!r})\nfrom tests.pretrain_setup import micro_config\n\n\n"
            f"def get_config(arg=None):\n"
            f"    return micro_config({data_dir!r}, {embeddings_dir!r}, **{overrides!r})\n"
        )
    return path
