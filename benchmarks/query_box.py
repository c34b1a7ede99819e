"""Does query-box localization learn? Mean IoU on held-out X-rays against the best constant box.

  python -m benchmarks.query_box [--steps=300] [--workdir=runs/bench/query_box]

Trains configs/multitask.py:demo with the query-box objective alone on the shipped COVID sample (train
split), then predicts the boxes of random regions of the validate + test images (the training
distribution of regions, 20 per image) and compares the mean IoU with that of the constant box that
scores best on those same regions (the trivial predictor). Prints the ratio last.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from mvlp_jax.data import built, transforms, views
from mvlp_jax.objectives.query_box import iou_and_giou
from mvlp_jax.pretrain import encoder as encoder_lib
from mvlp_jax.pretrain import train
from mvlp_jax.runtime import sharding
from mvlp_jax.tools import demo


def held_out_regions(config, per_image: int = 20, seed: int = 1) -> dict[str, np.ndarray]:
    builder, _, _ = built.open_builder(config.data.data_dir, config.data.dataset)
    size, q = config.model.image_size, config.query_box
    rng = np.random.default_rng(seed)
    images, queries, boxes = [], [], []
    for split in ("validate", "test"):
        source = built.open_split(builder, split)
        for i in range(len(source)):
            image = transforms.center_crop_resize(transforms.decode_png(source[i]["image"]), size)
            for _ in range(per_image):
                query, box = views.query_region(image, q.size, tuple(q.scale), rng)
                images.append(transforms.normalise(image, config.data.mean, config.data.std))
                queries.append(transforms.normalise(query, config.data.mean, config.data.std))
                boxes.append(box)
    return {"image": np.stack(images), "query": np.stack(queries), "box": np.stack(boxes)}


def best_constant_iou(boxes: np.ndarray) -> float:
    grid = np.linspace(0.1, 0.9, 17)
    candidates = np.array(
        [[cx, cy, w, h] for cx in (0.4, 0.5, 0.6) for cy in (0.4, 0.5, 0.6) for w in grid for h in grid], np.float32
    )
    return max(float(iou_and_giou(jnp.broadcast_to(c, boxes.shape), jnp.asarray(boxes))[0].mean()) for c in candidates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workdir", default=os.path.join(demo.REPO, "runs", "bench", "query_box"))
    args = parser.parse_args()
    demo.build_datasets()
    config = demo.load_config("multitask", "demo")
    config.data.data_dir, config.objectives, config.total_steps = demo.DATA_DIR, {"query_box": 1.0}, args.steps
    config.checkpoint.save_interval_steps = args.steps
    train.train(config, args.workdir)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(-1, 1, 1), sharding.AXES)
    encoder = encoder_lib.load(args.workdir, -1, mesh)
    held = held_out_regions(config)
    locate = jax.jit(lambda p, x, q: encoder.model.apply({"params": p}, x, q, train=False, method=locate))
    predicted = np.concatenate(
        [
            np.asarray(locate(encoder.params, held["image"][i : i + 64], held["query"][i : i + 64]))
            for i in range(0, len(held["box"]), 64)
        ]
    )
    model_iou = float(iou_and_giou(jnp.asarray(predicted), jnp.asarray(held["box"]))[0].mean())
    trivial = best_constant_iou(held["box"])
    print(
        f"{len(held['box'])} held-out regions; model (step {encoder.step}) mean IoU {model_iou:.3f}, "
        f"best constant box {trivial:.3f}"
    )
    print(f"query_box: held-out mean IoU / best constant box's = {model_iou / trivial:.2f}x")


if __name__ == "__main__":
    main()
