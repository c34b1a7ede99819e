"""What the accelerator at hand does with the production step: measured step time, images/s and MFU.

  python -m benchmarks.accelerator [--variant=B/16] [--per_device_batch=32] [--steps=10]

On the devices JAX finds (the GPUs of this host, a TPU host's chips; a CPU runs it too, at a small size, to
check the script): the full pretraining step of configs/pretrain.py (LLM contrastive + MAE, 4096-wide targets
as Llama-2-7b's, `model.dtype=auto`: bfloat16 compute on accelerators) at 224 px, the batch over every local
device, compiled once with `model.attention=auto` (cuDNN on GPU, Pallas splash on TPU) and once with `xla`. For
each: the median step time over --steps after two warm-up steps, images/s, and MFU against the device's dense
bfloat16 peak from one FLOP count for both (the step counted on one CPU with XLA's formula, as `mvlp_jax.aot`
counts GPU programs: attention kernels declare their FLOPs to XLA partly or not at all). Then the input
pipeline's images/s on this host (the shipped real COVID sample built at 256, 224 crops, the config's decode
threads), and last the ratio of auto's images/s to xla's.

Needs `make install` (plus `pip install -e '.[gpu]'` on GPUs); a few minutes on one H100 with the defaults.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from benchmarks.train_step import config_for, pipeline_rate
from mvlp_jax.models.pretrainer import Pretrainer
from mvlp_jax.pretrain import aot, optim, train_step
from mvlp_jax.runtime import sharding
from tests.pretrain_setup import build_sample, write_targets

TARGET_DIM = 4096  # Llama-2-7b's hidden size


def peak_flops(device) -> float | None:
    """Dense bfloat16 peak of one device (None where not known: CPUs, other GPUs)."""
    kind = device.device_kind.lower()
    if device.platform == "tpu":
        try:
            return aot.chip_of(device).peak_bf16_flops
        except ValueError:
            return None
    return next((peak for name, peak in aot.GPU_PEAK_BF16.items() if name in kind), None)


def production_config(variant: str, image_size: int, batch: int, attention: str):
    from configs import pretrain

    c = pretrain.get_config()
    c.data.embeddings_dir = ""
    c.model.variant, c.model.image_size, c.model.attention = variant, image_size, attention
    c.data.batch_size = batch
    return c


def measure_step(config, devices: list, steps: int, flops: float) -> dict:
    """Compiles the step on `devices` and times it on random images and targets; MFU from `flops` per step."""
    mesh = sharding.make_mesh(config, devices)
    model, tx = Pretrainer(config, TARGET_DIM), optim.make(config)
    state, state_sh = train_step.create_state(model, tx, config, mesh)
    shapes = jax.eval_shape(lambda: train_step.example_batch(config, TARGET_DIM, batch=config.data.batch_size))
    rng = np.random.default_rng(0)
    batch = {k: rng.normal(size=s.shape).astype(s.dtype) for k, s in shapes.items()}
    start = time.perf_counter()
    step = train_step.compile_train_step(train_step.make_train_step(model, tx, config), state, state_sh, mesh, shapes)
    compile_seconds = time.perf_counter() - start
    hlo = step.as_text()
    batch = sharding.global_batch(batch, mesh)
    times = []
    for i in range(steps + 2):
        begin = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        if i >= 2:
            times.append(time.perf_counter() - begin)
    seconds = statistics.median(times)
    peak = peak_flops(devices[0])
    return {
        "seconds": seconds,
        "images_per_s": config.data.batch_size / seconds,
        "flops": flops,
        "mfu": flops / seconds / (peak * len(devices)) if peak else None,
        "compile_seconds": compile_seconds,
        "kernel_calls": sum(hlo.count(k) for k in aot.ATTENTION_KERNELS),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--per_device_batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pipeline_batches", type=int, default=20)
    args = parser.parse_args()
    devices = jax.local_devices()
    batch = args.per_device_batch * len(devices)
    print(
        f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}); {args.variant} at {args.image_size} "
        f"px, batch {batch}, LLM contrastive + MAE, {TARGET_DIM}-wide targets",
        flush=True,
    )
    # One count for both rows: XLA's formula on one CPU (a Pallas or cuDNN call declares its FLOPs to XLA
    # partly or not at all, and a GPU program has no cost analysis).
    flops = aot.counted_on_one_cpu("train", production_config(args.variant, args.image_size, batch, "xla"), TARGET_DIM)[
        0
    ]
    rows = {}
    for attention in ("auto", "xla"):
        config = production_config(args.variant, args.image_size, batch, attention)
        rows[attention] = measure_step(config, devices, args.steps, flops)
        r = rows[attention]
        print(
            f"  attention {attention}: compiled in {r['compile_seconds']:.0f} s, {r['kernel_calls']} attention "
            f"kernel calls, {r['seconds'] * 1e3:.1f} ms/step",
            flush=True,
        )
    with tempfile.TemporaryDirectory() as root:
        data_dir = build_sample(root, image_size=256)
        write_targets(data_dir, os.path.join(root, "emb"), hidden=TARGET_DIM)
        feed_config = config_for(data_dir, os.path.join(root, "emb"), args.variant, batch)
        feed = pipeline_rate(feed_config, args.pipeline_batches)
    print("\n| attention | ms/step | images/s | FLOPs/step | MFU | attention kernel calls |")
    print("| --- | --- | --- | --- | --- | --- |")
    for attention, r in rows.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (no peak known)"
        print(
            f"| {attention} | {r['seconds'] * 1e3:.1f} | {r['images_per_s']:.1f} | {r['flops']:.3e} | {mfu} | "
            f"{r['kernel_calls']} |"
        )
    print(
        f"\ninput pipeline on this host ({os.cpu_count()} CPUs, real COVID sample, 224 crops): {feed:.1f} images/s "
        f"({feed / rows['auto']['images_per_s']:.2f}x what the step eats)"
    )
    print(f"accelerator: auto / xla images/s: {rows['auto']['images_per_s'] / rows['xla']['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
