"""Does DINO learn? Two crops of the same held-out X-ray should find each other among all the others.

  python -m benchmarks.dino_views [--steps=150] [--workdir=runs/bench/dino_views] [--set=dino.center_momentum=0.5]

Trains configs/multitask.py:demo with the DINO objective alone on the shipped COVID sample, then takes two
random global crops (DINO's scale range and intensity jitter) of each of the 800 NIH sample images (a dataset
it never saw) and asks, for each first crop, whether the nearest second crop by cosine of the centred,
mean-pooled encoder features is its own. Compares this top-1 view retrieval with that of the same
architecture at its initialisation (random features already match crops by their low-level statistics:
DINO should raise it). Scores the EMA teacher (the network DINO evaluates) and the student; prints the
teacher's ratio last.
"""

from __future__ import annotations

import argparse
import ast
import os

import jax
import numpy as np

from mvlp_jax.data import built, transforms, views
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.pretrain import encoder as encoder_lib
from mvlp_jax.pretrain import train
from mvlp_jax.runtime import sharding
from mvlp_jax.tools import demo


def paired_crops(config, seed: int = 1) -> np.ndarray:
    """(2, N, S, S, 1) normalised global crops, two per image of every split of the NIH sample."""
    d, data = config.dino, config.data
    rng = np.random.default_rng(seed)
    crops = []
    builder, _, _ = built.open_builder(config.data.data_dir, "nih_sample")
    for split in ("train", "valid"):
        source = built.open_split(builder, split)
        for i in range(len(source)):
            image = transforms.decode_png(source[i]["image"])
            pair, _ = views.multi_crop(
                [image],
                (0, 0),
                [],
                config.model.image_size,
                d.local_size,
                tuple(d.global_scale),
                tuple(d.local_scale),
                data.brightness,
                data.contrast,
                rng,
            )
            crops.append(transforms.normalise(pair, data.mean, data.std))
    return np.stack(crops, axis=1)


def view_retrieval(encoder: encoder_lib.Encoder, crops: np.ndarray, mesh: jax.sharding.Mesh) -> dict[str, float]:
    """Retrieving each image's second crop from its first among all second crops: top-1 and top-5 accuracy,
    and the median rank of the true match (0 = found first)."""
    forward = jax.jit(lambda p, x: encoder.model.apply({"params": p}, x, "mean", method=Pretrainer.features))
    with sharding.active(mesh):
        embed = lambda x: np.concatenate(
            [np.asarray(forward(encoder.params, x[i : i + 64])) for i in range(0, len(x), 64)]
        )
        first, second = embed(crops[0]), embed(crops[1])
    mean = np.concatenate([first, second]).mean(axis=0)
    unit = lambda f: (f - mean) / np.linalg.norm(f - mean, axis=1, keepdims=True)
    similarity = unit(first) @ unit(second).T
    rank = (similarity > similarity.diagonal()[:, None]).sum(axis=1)
    return {"top1": float(np.mean(rank == 0)), "top5": float(np.mean(rank < 5)), "median_rank": float(np.median(rank))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--workdir", default=os.path.join(demo.REPO, "runs", "bench", "dino_views"))
    parser.add_argument("--set", action="append", default=[], help="config override KEY=PYTHON_VALUE")
    args = parser.parse_args()
    demo.build_datasets()
    config = demo.load_config("multitask", "demo")
    config.data.data_dir, config.objectives, config.total_steps = demo.DATA_DIR, {"dino": 1.0}, args.steps
    config.checkpoint.save_interval_steps = args.steps
    config.update_from_flattened_dict({k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.set)})
    train.train(config, args.workdir)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(-1, 1, 1), sharding.AXES)
    crops = paired_crops(config)
    student = view_retrieval(encoder_lib.load(args.workdir, -1, mesh), crops, mesh)
    teacher = view_retrieval(encoder_lib.load(args.workdir, -1, mesh, teacher=True), crops, mesh)
    initial = view_retrieval(encoder_lib.load(encoder_lib.RANDOM_INIT, -1, mesh, like=args.workdir), crops, mesh)
    describe = lambda r: f"top-1 {r['top1']:.3f}, top-5 {r['top5']:.3f}, median rank {r['median_rank']:.0f}"
    print(
        f"{crops.shape[1]} held-out NIH images, 2 global crops each (chance: top-1 {1 / crops.shape[1]:.4f}, "
        f"median rank {(crops.shape[1] - 1) / 2:.0f}):\n  DINO student ({args.steps} steps): {describe(student)}\n"
        f"  DINO teacher: {describe(teacher)}\n  initialisation: {describe(initial)}"
    )
    print(f"dino_views: top-1 view retrieval, DINO teacher / initialisation = {teacher['top1'] / initial['top1']:.2f}x")


if __name__ == "__main__":
    main()
