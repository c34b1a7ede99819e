"""Can the input pipeline feed the pretraining step? Both measured in the same run on this machine.

  python -m benchmarks.train_step [--variants=S/16,B/16] [--batch=16] [--steps=3]

Step: the full pretraining step (LLM contrastive + MAE, forward + backward + AdamW) at 224, float32
(faster than bfloat16 on CPUs), one device. Pipeline: grain over the real shipped COVID sample
(built at 256), PNG decode, RandomResizedCrop to 224, intensity jitter, normalise, join to LLM
targets (stand-ins of SmolLM2's width 576), batched, with the config's threads. Prints the ratio of
pipeline images/s to the slowest step's images/s last (target >= 2: input never starves the step).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from mvlp_jax.data import pipeline
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.pretrain import optim
from mvlp_jax.pretrain import train_step as ts
from mvlp_jax.runtime import sharding
from tests.pretrain_setup import build_sample, micro_config, write_targets

HIDDEN = 576


def config_for(data_dir: str, emb_dir: str, name: str, batch: int):
    c = micro_config(
        data_dir,
        emb_dir,
        **{
            "model.image_size": 224,
            "model.dtype": "float32",
            "mesh.data": 1,
            "data.batch_size": batch,
            "data.num_threads": os.cpu_count() or 2,
        },
    )
    c.model.variant = name
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads, c.model.pool_heads = 512, 8, 16, 8
    return c


def step_rate(config, steps: int) -> float:
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    model, tx = Pretrainer(config, HIDDEN), optim.make(config)
    state, state_sh = ts.create_state(model, tx, config, mesh)
    rng = np.random.default_rng(0)
    b = config.data.batch_size
    batch = {
        "image": rng.normal(size=(b, 224, 224, 1)).astype(np.float32),
        "target": rng.normal(size=(b, HIDDEN)).astype(np.float32),
    }
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    step = ts.compile_train_step(ts.make_train_step(model, tx, config), state, state_sh, mesh, shapes)
    batch = sharding.global_batch(batch, mesh)
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return b * steps / (time.perf_counter() - start)


def pipeline_rate(config, batches: int) -> float:
    records = pipeline.open_records(config)
    iterator = pipeline.TrainIterator(pipeline.local_batches(records, config, 0, 1), config)
    next(iterator)  # thread start-up
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return config.data.batch_size * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="S/16,B/16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pipeline_batches", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        data_dir = build_sample(root, image_size=256)
        write_targets(data_dir, os.path.join(root, "emb"), hidden=HIDDEN)
        emb = os.path.join(root, "emb")
        feed = pipeline_rate(config_for(data_dir, emb, "B/16", args.batch), args.pipeline_batches)
        print(f"input pipeline (real COVID sample, 224 crops, {os.cpu_count()} threads): {feed:.1f} img/s")
        rates = {}
        for name in args.variants.split(","):
            rates[name] = step_rate(config_for(data_dir, emb, name, args.batch), args.steps)
            print(f"pretraining step {name} @224 (contrastive + MAE, batch {args.batch}): {rates[name]:.2f} img/s")
    slowest = min(rates, key=rates.get)
    print(f"train_step: pipeline / step images/s ({slowest}): {feed / rates[slowest]:.1f}x")


if __name__ == "__main__":
    main()
